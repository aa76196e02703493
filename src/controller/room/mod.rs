pub mod fold;
pub mod plan;
