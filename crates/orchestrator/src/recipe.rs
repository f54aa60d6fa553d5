//! What a custom template build does, parsed from a client's spec: the
//! structured form (`base_image`, `packages`, `run_cmds`, `envs`,
//! `start_cmd`) or a Dockerfile subset (`FROM`, `RUN`, `ENV`, `WORKDIR`,
//! `USER`, `CMD`, `ENTRYPOINT`). Both become the same [`BuildRecipe`]: a
//! built-in base template plus steps that run inside a build sandbox.
//!
//! Base images are mapped onto the templates this server builds from its
//! Debian mirror; a name it cannot map is a clear error, never a guess.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// A Dockerfile is capped at this (as the SDK documents).
pub const MAX_DOCKERFILE_BYTES: usize = 64 << 10;
const MAX_STEPS: usize = 200;
const MAX_LINE_BYTES: usize = 16 << 10;
const MAX_PACKAGES: usize = 500;
const MAX_ENVS: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecipe {
    /// The built-in template the build starts from.
    pub base: String,
    /// The base image the client named (for the log).
    pub base_image: String,
    pub steps: Vec<BuildStep>,
    /// Environment of every sandbox of the template (and of later steps).
    pub envs: BTreeMap<String, String>,
    /// Started in the background in every new sandbox of the template.
    pub start_cmd: Option<String>,
    /// User and working directory of the start command.
    pub user: String,
    pub workdir: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BuildStep {
    /// `apt-get install` of these packages, as root.
    Packages { names: Vec<String> },
    /// One shell line (`/bin/sh -c`).
    Run {
        cmd: String,
        user: String,
        cwd: Option<String>,
        envs: BTreeMap<String, String>,
    },
}

impl BuildStep {
    /// The shell line and user this step runs as.
    pub fn command(&self) -> (String, &str) {
        match self {
            BuildStep::Packages { names } => (
                format!(
                    "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                     --no-install-recommends {} && apt-get clean && rm -rf /var/lib/apt/lists/*",
                    names.join(" ")
                ),
                "root",
            ),
            BuildStep::Run { cmd, user, .. } => (cmd.clone(), user),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            BuildStep::Packages { names } => format!("apt-get install {}", names.join(" ")),
            BuildStep::Run { cmd, .. } => format!("RUN {}", shorten(cmd)),
        }
    }
}

fn shorten(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.len() > 120 || text.contains('\n') {
        let mut cut = line.len().min(117);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &line[..cut])
    } else {
        line.to_string()
    }
}

/// The built-in template a base image name builds on, if any.
pub fn base_template(image: &str) -> Option<&'static str> {
    let image = image.trim().to_ascii_lowercase();
    let (name, tag) = image.split_once(':').unwrap_or((&image, "latest"));
    let name = name.strip_prefix("docker.io/").unwrap_or(name);
    let name = name.strip_prefix("library/").unwrap_or(name);
    match (name, tag) {
        ("base", _) => Some("base"),
        ("python", t) if t == "latest" || t.starts_with('3') || t.starts_with("slim") => {
            Some("python")
        }
        ("debian", "latest" | "bookworm" | "bookworm-slim" | "12" | "12-slim" | "stable") => {
            Some("base")
        }
        // Ubuntu images are built as Debian bookworm: the same package
        // manager and nearly the same names (the log says so).
        ("ubuntu", _) => Some("base"),
        _ => None,
    }
}

fn unknown_base(image: &str) -> String {
    format!(
        "base image {image:?} cannot be built here: this server builds on its Debian bookworm \
         templates (debian:bookworm, ubuntu:*, python:3.*, base, python)"
    )
}

fn check_line(what: &str, text: &str) -> Result<(), String> {
    if text.len() > MAX_LINE_BYTES {
        return Err(format!("{what} is longer than {MAX_LINE_BYTES} bytes"));
    }
    if text.contains('\0') {
        return Err(format!("{what} contains a NUL byte"));
    }
    Ok(())
}

/// A Debian package name, optionally `=version` (nothing a shell would
/// read as more than one word).
fn check_package(name: &str) -> Result<(), String> {
    let (package, version) = name.split_once('=').unwrap_or((name, ""));
    let package_ok = !package.is_empty()
        && package.len() <= 128
        && package.as_bytes()[0].is_ascii_alphanumeric()
        && package
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let version_ok = version
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+-.:~".contains(&b));
    if package_ok && version_ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a Debian package name"))
    }
}

fn check_env_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not an environment variable name"))
    }
}

impl BuildRecipe {
    /// Parses the `template` field of `POST /templates/build`.
    pub fn from_spec(spec: &Value) -> Result<Self, String> {
        let object = spec
            .as_object()
            .ok_or("template must be a JSON object (the spec)")?;
        if let Some(dockerfile) = object.get("dockerfile") {
            let text = dockerfile.as_str().ok_or("dockerfile must be a string")?;
            return Self::from_dockerfile(text);
        }
        let string = |key: &str| -> Result<Option<String>, String> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("{key} must be a string")),
            }
        };
        let strings = |key: &str| -> Result<Vec<String>, String> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or(format!("{key} must be a list of strings")),
                Some(_) => Err(format!("{key} must be a list of strings")),
            }
        };
        let base_image = string("base_image")?.unwrap_or_else(|| "ubuntu:22.04".into());
        let base = base_template(&base_image).ok_or_else(|| unknown_base(&base_image))?;
        let mut envs = BTreeMap::new();
        match object.get("envs") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (key, value) in map {
                    let value = value.as_str().ok_or("envs values must be strings")?;
                    check_env_name(key)?;
                    check_line("an env value", value)?;
                    envs.insert(key.clone(), value.to_string());
                }
            }
            Some(_) => return Err("envs must be an object of strings".into()),
        }
        // `@declaw/sdk` 1.3.0 sends `apt_packages`; both are honoured.
        let mut packages = strings("packages")?;
        packages.extend(strings("apt_packages")?);
        let run_cmds = strings("run_cmds")?;
        let mut steps = Vec::new();
        if !packages.is_empty() {
            if packages.len() > MAX_PACKAGES {
                return Err(format!("at most {MAX_PACKAGES} packages"));
            }
            packages.iter().try_for_each(|p| check_package(p))?;
            steps.push(BuildStep::Packages { names: packages });
        }
        for cmd in run_cmds {
            check_line("a run_cmd", &cmd)?;
            steps.push(BuildStep::Run {
                cmd,
                user: "root".into(),
                cwd: None,
                envs: envs.clone(),
            });
        }
        let start_cmd = string("start_cmd")?.filter(|c| !c.trim().is_empty());
        if let Some(cmd) = &start_cmd {
            check_line("start_cmd", cmd)?;
        }
        let recipe = BuildRecipe {
            base: base.into(),
            base_image,
            steps,
            envs,
            start_cmd,
            user: "user".into(),
            workdir: None,
        };
        recipe.check_size()
    }

    /// The Dockerfile subset. Anything else fails naming its line.
    pub fn from_dockerfile(text: &str) -> Result<Self, String> {
        if text.len() > MAX_DOCKERFILE_BYTES {
            return Err(format!(
                "the Dockerfile is larger than {MAX_DOCKERFILE_BYTES} bytes"
            ));
        }
        let mut recipe: Option<BuildRecipe> = None;
        let (mut entrypoint, mut cmd): (Option<String>, Option<String>) = (None, None);
        let mut user = "root".to_string();
        for (number, line) in logical_lines(text) {
            let at = |message: String| format!("Dockerfile line {number}: {message}");
            let (instruction, rest) = line
                .split_once(char::is_whitespace)
                .map(|(i, r)| (i, r.trim()))
                .unwrap_or((line.as_str(), ""));
            let instruction = instruction.to_ascii_uppercase();
            if instruction != "FROM" && recipe.is_none() {
                return Err(at("the first instruction must be FROM".into()));
            }
            match instruction.as_str() {
                "FROM" => {
                    if recipe.is_some() {
                        return Err(at(
                            "only one FROM (multi-stage builds are not supported)".into()
                        ));
                    }
                    let image = rest.split_whitespace().next().unwrap_or("");
                    let base = base_template(image).ok_or_else(|| at(unknown_base(image)))?;
                    recipe = Some(BuildRecipe {
                        base: base.into(),
                        base_image: image.into(),
                        steps: Vec::new(),
                        envs: BTreeMap::new(),
                        start_cmd: None,
                        user: "root".into(),
                        workdir: None,
                    });
                }
                "RUN" | "ENV" | "WORKDIR" | "USER" | "CMD" | "ENTRYPOINT" => {
                    let recipe = recipe.as_mut().expect("FROM came first");
                    check_line("the instruction", rest).map_err(at)?;
                    if rest.is_empty() {
                        return Err(at(format!("{instruction} needs an argument")));
                    }
                    match instruction.as_str() {
                        "RUN" => recipe.steps.push(BuildStep::Run {
                            cmd: shell_form(rest).map_err(at)?,
                            user: user.clone(),
                            cwd: recipe.workdir.clone(),
                            envs: recipe.envs.clone(),
                        }),
                        "ENV" => {
                            for (key, value) in env_pairs(rest).map_err(at)? {
                                check_env_name(&key).map_err(at)?;
                                recipe.envs.insert(key, value);
                            }
                        }
                        "WORKDIR" => {
                            if !rest.starts_with('/') {
                                return Err(at("WORKDIR must be an absolute path".into()));
                            }
                            recipe.steps.push(BuildStep::Run {
                                cmd: format!("mkdir -p {}", shell_quote(rest)),
                                user: "root".into(),
                                cwd: None,
                                envs: BTreeMap::new(),
                            });
                            recipe.workdir = Some(rest.to_string());
                        }
                        "USER" => {
                            let name = rest.split(':').next().unwrap_or(rest);
                            if !name
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
                            {
                                return Err(at(format!("{rest:?} is not a user name")));
                            }
                            user = name.to_string();
                        }
                        "CMD" => cmd = Some(shell_form(rest).map_err(at)?),
                        _ => entrypoint = Some(shell_form(rest).map_err(at)?),
                    }
                }
                other => {
                    return Err(at(format!(
                        "{other} is not supported (only FROM, RUN, ENV, WORKDIR, USER, CMD and \
                         ENTRYPOINT; a build cannot upload local files)"
                    )))
                }
            }
        }
        let mut recipe = recipe.ok_or("the Dockerfile has no FROM")?;
        recipe.start_cmd = match (entrypoint, cmd) {
            (Some(e), Some(c)) => Some(format!("{e} {c}")),
            (e, c) => e.or(c),
        };
        recipe.user = user;
        recipe.check_size()
    }

    fn check_size(self) -> Result<Self, String> {
        if self.steps.len() > MAX_STEPS {
            return Err(format!("at most {MAX_STEPS} build steps"));
        }
        if self.envs.len() > MAX_ENVS {
            return Err(format!("at most {MAX_ENVS} environment variables"));
        }
        Ok(self)
    }
}

/// Lines with `\` continuations joined, comments and blanks dropped, each
/// with the number of the line it starts on.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut lines = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if current.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        let (continues, body) = match trimmed.strip_suffix('\\') {
            Some(body) => (true, body),
            None => (false, trimmed),
        };
        let entry = current.get_or_insert_with(|| (index + 1, String::new()));
        if !body.starts_with('#') {
            if !entry.1.is_empty() {
                entry.1.push(' ');
            }
            entry.1.push_str(body.trim());
        }
        if !continues {
            lines.extend(current.take());
        }
    }
    lines.extend(current);
    lines
}

/// `RUN ["a", "b"]` (exec form, quoted for the shell) or a shell line.
fn shell_form(rest: &str) -> Result<String, String> {
    if rest.starts_with('[') {
        let words: Vec<String> =
            serde_json::from_str(rest).map_err(|e| format!("not a JSON array of strings: {e}"))?;
        if words.is_empty() {
            return Err("an empty command".into());
        }
        return Ok(words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" "));
    }
    Ok(rest.to_string())
}

fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// `ENV A=1 B="two words"` or the legacy `ENV A one value`.
fn env_pairs(rest: &str) -> Result<Vec<(String, String)>, String> {
    if !rest.split_whitespace().next().unwrap_or("").contains('=') {
        let (key, value) = rest
            .split_once(char::is_whitespace)
            .ok_or("ENV needs a value")?;
        return Ok(vec![(key.to_string(), value.trim().to_string())]);
    }
    let mut pairs = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        let mut value = String::new();
        let mut quote = None;
        while let Some(&c) = chars.peek() {
            match (quote, c) {
                (None, c) if c.is_whitespace() => break,
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (_, '\\') => {
                    chars.next();
                    if let Some(escaped) = chars.peek() {
                        value.push(*escaped);
                    }
                }
                (_, c) => value.push(c),
            }
            chars.next();
        }
        if quote.is_some() {
            return Err("an unterminated quote in ENV".into());
        }
        pairs.push((key.trim().to_string(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn structured_specs_become_steps() {
        let recipe = BuildRecipe::from_spec(&json!({
            "base_image": "ubuntu:22.04",
            "packages": ["jq", "libfoo=1.2-3"],
            "run_cmds": ["pip3 install pandas"],
            "envs": {"A": "1"},
            "start_cmd": "python3 -m http.server",
            "unknown": "ignored",
        }))
        .unwrap();
        assert_eq!(recipe.base, "base");
        assert_eq!(recipe.steps.len(), 2);
        assert!(recipe.steps[0]
            .command()
            .0
            .contains("install -y -q --no-install-recommends jq libfoo=1.2-3"));
        assert_eq!(recipe.start_cmd.as_deref(), Some("python3 -m http.server"));
        assert_eq!(recipe.user, "user");
        for bad in [
            json!({"packages": ["jq; rm -rf /"]}),
            json!({"packages": "jq"}),
            json!({"base_image": "alpine:3"}),
            json!({"envs": {"1A": "x"}}),
            json!("not an object"),
        ] {
            assert!(BuildRecipe::from_spec(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dockerfile_subset_and_its_errors_name_the_line() {
        let recipe = BuildRecipe::from_dockerfile(
            "# comment\nFROM python:3.11-slim AS app\nENV A=1 B=\"two words\"\nWORKDIR /app\n\
             RUN echo one \\\n    && echo two\nUSER user\nRUN [\"echo\", \"it's\"]\nCMD [\"python3\", \"-V\"]\n",
        )
        .unwrap();
        assert_eq!(recipe.base, "python");
        assert_eq!(recipe.envs["B"], "two words");
        assert_eq!(recipe.workdir.as_deref(), Some("/app"));
        assert_eq!(recipe.user, "user");
        assert_eq!(recipe.start_cmd.as_deref(), Some("'python3' '-V'"));
        match &recipe.steps[1] {
            BuildStep::Run {
                cmd,
                cwd,
                user,
                envs,
            } => {
                assert_eq!(cmd, "echo one && echo two");
                assert_eq!(cwd.as_deref(), Some("/app"));
                assert_eq!(user, "root");
                assert_eq!(envs["A"], "1");
            }
            other => panic!("{other:?}"),
        }
        match &recipe.steps[2] {
            BuildStep::Run { cmd, user, .. } => {
                assert_eq!(cmd, "'echo' 'it'\\''s'");
                assert_eq!(user, "user");
            }
            other => panic!("{other:?}"),
        }
        let error = BuildRecipe::from_dockerfile("FROM debian:bookworm\nRUN true\nCOPY . /app\n")
            .unwrap_err();
        assert!(
            error.starts_with("Dockerfile line 3: COPY is not supported"),
            "{error}"
        );
        let error = BuildRecipe::from_dockerfile("RUN true\n").unwrap_err();
        assert!(error.contains("line 1"), "{error}");
        let error = BuildRecipe::from_dockerfile("FROM alpine\n").unwrap_err();
        assert!(error.contains("cannot be built here"), "{error}");
        assert!(BuildRecipe::from_dockerfile(&"#".repeat(70_000)).is_err());
    }
}
