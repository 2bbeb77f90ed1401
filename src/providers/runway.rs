//! Runway tasks API. SKELETON: to be written (every call fails until then).

use super::transport::HttpTransport;
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderStatus,
    ProviderTask, SubmitRequest, VideoProvider,
};

/// A provider speaking the Runway tasks API.
#[derive(Debug)]
pub struct RunwayProvider {
    transport: HttpTransport,
}

impl RunwayProvider {
    /// Builds the adapter for provider `name`.
    ///
    /// # Errors
    /// [`ProviderConfigError`] naming `providers.<name>.<key>` when a setting is unusable.
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, ProviderConfigError> {
        Ok(Self {
            transport: HttpTransport::new(name, settings)?,
        })
    }
}

#[async_trait::async_trait]
impl VideoProvider for RunwayProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, _request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        Err(ProviderError::permanent("runway: not implemented yet"))
    }

    async fn status(
        &self,
        _task: &ProviderTask,
        _traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        Err(ProviderError::permanent("runway: not implemented yet"))
    }

    async fn cancel(&self, _task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        Err(ProviderError::permanent("runway: not implemented yet"))
    }
}
