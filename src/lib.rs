pub mod files;
pub mod api;
pub mod fleet;
