//! Every adapter by the `kind` that selects it, and [`Providers`]: the configured set, built once
//! from settings, with the model → provider routing.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    dashscope, fal, gemini, kling, luma, minimax, openai_videos, replicate, runway, seedance,
    vertex_veo, ProviderConfigError, ProviderSettings, RoutingSettings, VideoProvider,
};

/// Declares [`ProviderKind`], its spellings, [`ProviderKind::ALL`] and how each kind is built,
/// from one list, so that none of them can drift apart. Every adapter has `new(name,
/// &ProviderSettings) -> Result<Self, ProviderConfigError>`.
macro_rules! adapters {
    ($($(#[$doc:meta])* $kind:ident = $name:literal => $adapter:ty,)+) => {
        /// The protocol a provider speaks: `providers.<name>.kind`, in snake case.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
        pub enum ProviderKind {
            $($(#[$doc])* #[serde(rename = $name)] $kind,)+
        }

        impl ProviderKind {
            /// Every kind, in the order of the list below.
            pub const ALL: [ProviderKind; [$($name),+].len()] = [$(Self::$kind),+];

            /// The configuration spelling, e.g. `vertex_veo`.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$kind => $name,)+
                }
            }

            /// Builds the adapter of this kind for provider `name`.
            ///
            /// # Errors
            /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is
            /// unusable.
            pub fn build(
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
    OpenaiVideos = "openai_videos" => openai_videos::OpenAiVideosProvider,
    /// Replicate's predictions API.
    Replicate = "replicate" => replicate::ReplicateProvider,
    /// fal.ai's queue API, in front of many models.
    Fal = "fal" => fal::FalProvider,
    /// Google Veo on Vertex AI (`predictLongRunning` / `fetchPredictOperation`).
    VertexVeo = "vertex_veo" => vertex_veo::VertexVeoProvider,
    /// Veo on the Gemini API (`x-goog-api-key`, long-running operations).
    Gemini = "gemini" => gemini::GeminiProvider,
    /// Runway's tasks API.
    Runway = "runway" => runway::RunwayProvider,
    /// Kling's video tasks API (JWT bearer).
    Kling = "kling" => kling::KlingProvider,
    /// ByteDance Seedance on BytePlus ModelArk.
    Seedance = "seedance" => seedance::SeedanceProvider,
    /// Alibaba Wan on DashScope (asynchronous tasks).
    Dashscope = "dashscope" => dashscope::DashscopeProvider,
    /// MiniMax (Hailuo) video generation.
    Minimax = "minimax" => minimax::MinimaxProvider,
    /// Luma Dream Machine generations.
    Luma = "luma" => luma::LumaProvider,
}

impl ProviderKind {
    /// The kind's own floor under the interval between two status checks of one job, in ms.
    #[must_use]
    pub fn default_min_status_interval_ms(self) -> u64 {
        match self {
            // "Do not poll more often than once every five seconds" (Runway's API guide).
            Self::Runway => 5_000,
            _ => 0,
        }
    }

    /// The kind's own cap on status calls per second from one instance.
    #[must_use]
    pub fn default_max_status_rps(self) -> Option<f64> {
        match self {
            // DashScope allows 20 task queries per second per account.
            Self::Dashscope => Some(20.0),
            _ => None,
        }
    }
}

impl std::str::FromStr for ProviderKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown provider kind \"{text}\" (known: {})",
                    known.join(", ")
                )
            })
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The configured providers and the routing between them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Providers {
    by_name: HashMap<String, Arc<dyn VideoProvider>>,
    /// Provider name → the floor under its status-check interval, when it has one.
    floors: HashMap<String, std::time::Duration>,
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
        let mut floors = HashMap::new();
        for (name, provider) in settings {
            by_name.insert(name.clone(), provider.kind.build(name, provider)?);
            let floor = provider.min_status_interval();
            if !floor.is_zero() {
                floors.insert(name.clone(), floor);
            }
        }
        routing.validate(settings)?;
        let routes = routing
            .models
            .iter()
            .map(|route| (route.model.clone(), route.provider.clone()))
            .collect();
        Ok(Self {
            by_name,
            floors,
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

    /// The floor under the interval between two status checks of one job at provider `name`
    /// (`providers.<name>.min_status_interval_ms` or the kind's default), when it has one.
    #[must_use]
    pub fn min_status_interval(&self, name: &str) -> Option<std::time::Duration> {
        self.floors.get(name).copied()
    }

    /// The configured provider names, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().cloned().collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::ProviderKind;

    #[test]
    fn every_kind_reads_back_from_its_spelling_in_config_and_in_text() {
        for kind in ProviderKind::ALL {
            let from_config: ProviderKind =
                serde_json::from_value(serde_json::json!(kind.as_str())).expect("serde spelling");
            assert_eq!(from_config, kind);
            assert_eq!(kind.as_str().parse::<ProviderKind>(), Ok(kind));
            assert_eq!(
                serde_json::to_value(kind).expect("serialises"),
                serde_json::json!(kind.as_str())
            );
        }
        let unknown = "sora".parse::<ProviderKind>().unwrap_err();
        assert!(
            unknown.contains("known: openai_videos, replicate, fal"),
            "{unknown}"
        );
    }
}
