# sandbox-manager control plane image. Build: docker build -t sandbox-manager .
#
# Dependencies are compiled in their own layer (cargo-chef): a change to
# our sources rebuilds only our crates, not the ~400 dependencies.
FROM rust:1-bookworm AS chef
RUN cargo install --locked cargo-chef@0.1.78
WORKDIR /src

FROM chef AS plan
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=plan /src/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json -p sandbox-manager -p envd
COPY . .
RUN cargo build --release -p sandbox-manager -p envd \
 && cp target/release/sandbox-manager target/release/envd /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates mmdebstrap iproute2 e2fsprogs \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/sandbox-manager /usr/local/bin/envd /usr/local/bin/
# For the compose stack's one-shot Garage set-up (scripts/garage-init.sh).
COPY --from=dxflrs/garage:v2.1.0 /garage /usr/local/bin/garage
COPY config /etc/sandbox-manager
WORKDIR /var/lib/sandbox-manager
EXPOSE 8080
ENTRYPOINT ["sandbox-manager"]
CMD ["serve", "--config", "/etc/sandbox-manager/production.example.toml"]
