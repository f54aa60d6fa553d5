pub mod commands;
pub mod files;
pub mod health;
pub mod sandboxes;
pub mod volumes;
