//! openmeet-matrix-operator: converges a Matrix homeserver (Synapse) to the
//! rooms, users and permissions the OpenMeet platform declares.

pub mod api;
pub mod controller;
pub mod kube_metrics;
pub mod mas;
pub mod metrics;
pub mod registration;
pub mod secrets;
pub mod sidecar;
pub mod synapse;
pub mod telemetry;
