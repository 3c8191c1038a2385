pub mod api;
pub mod files;
pub mod fleet;
