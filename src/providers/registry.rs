//! Every adapter by the `kind` that selects it, and [`Providers`]: the configured set, built once
//! from settings, with the model → provider routing.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    openai_videos, replicate, ProviderConfigError, ProviderSettings, RoutingSettings, VideoProvider,
};

/// Declares [`ProviderKind`] and how each kind is built, from one list, so that the two cannot
/// drift apart. Every adapter has `new(name, &ProviderSettings) -> Result<Self,
/// ProviderConfigError>`.
macro_rules! adapters {
    ($($(#[$doc:meta])* $kind:ident => $adapter:ty,)+) => {
        /// The protocol a provider speaks: `providers.<name>.kind`, in snake case.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum ProviderKind {
            $($(#[$doc])* $kind,)+
        }

        impl ProviderKind {
            fn build(
                self,
                name: &str,
                settings: &ProviderSettings,
            ) -> Result<Arc<dyn VideoProvider>, ProviderConfigError> {
                Ok(match self {
                    $(Self::$kind => Arc::new(<$adapter>::new(name, settings)?),)+
                })
            }
        }
    };
}

// Adding a provider: its adapter file, its simulated protocol under `sim/`, and one line here.
adapters! {
    /// The OpenAI-compatible Videos API.
    OpenaiVideos => openai_videos::OpenAiVideosProvider,
    /// Replicate's predictions API.
    Replicate => replicate::ReplicateProvider,
}

/// The configured providers and the routing between them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Providers {
    by_name: HashMap<String, Arc<dyn VideoProvider>>,
    /// Model → provider name.
    routes: HashMap<String, String>,
    default_provider: Option<String>,
}

impl Providers {
    /// Builds every configured provider and checks the routing against them.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming the key when a provider's settings fail
    /// [`ProviderSettings::validate`] or the routing fails [`RoutingSettings::validate`]; or
    /// [`ProviderConfigError::HttpClient`] when an HTTP client cannot be built.
    pub fn from_settings(
        settings: &HashMap<String, ProviderSettings>,
        routing: &RoutingSettings,
    ) -> Result<Self, ProviderConfigError> {
        let mut by_name = HashMap::new();
        for (name, provider) in settings {
            by_name.insert(name.clone(), provider.kind.build(name, provider)?);
        }
        routing.validate(settings)?;
        let routes = routing
            .models
            .iter()
            .map(|route| (route.model.clone(), route.provider.clone()))
            .collect();
        Ok(Self {
            by_name,
            routes,
            default_provider: routing.default_provider.clone(),
        })
    }

    /// The provider for a request: the requested one if given (and `None` if it is not
    /// configured, rather than silently sending elsewhere), otherwise the model's route, otherwise
    /// the default provider.
    #[must_use]
    pub fn route(
        &self,
        model: &str,
        requested_provider: Option<&str>,
    ) -> Option<Arc<dyn VideoProvider>> {
        if let Some(requested) = requested_provider {
            return self.get(requested);
        }
        let name = self.routes.get(model).or(self.default_provider.as_ref())?;
        self.get(name)
    }

    /// The provider configured under `providers.<name>`, if any.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Arc<dyn VideoProvider>> {
        self.by_name.get(name).cloned()
    }

    /// The configured provider names, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().cloned().collect();
        names.sort_unstable();
        names
    }
}
