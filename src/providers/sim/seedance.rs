//! The simulated ByteDance Seedance on BytePlus ModelArk. SKELETON: no routes yet.

use super::Shared;
use crate::providers::{ProviderKind, ProviderSettings};
use axum::Router;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
}

/// Settings for a provider of this kind served by the simulator at `base_url`.
pub(super) fn provider_settings(base_url: &str) -> ProviderSettings {
    ProviderSettings::new(ProviderKind::Seedance, base_url)
}
