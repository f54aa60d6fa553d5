pub mod health;
pub mod volumes;
