//! Veo on the Gemini API. SKELETON: to be written (every call fails until then).

use super::transport::HttpTransport;
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderStatus,
    ProviderTask, SubmitRequest, VideoProvider,
};

/// A provider speaking the Veo on the Gemini API.
#[derive(Debug)]
pub struct GeminiProvider {
    transport: HttpTransport,
}

impl GeminiProvider {
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
impl VideoProvider for GeminiProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, _request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        Err(ProviderError::permanent("gemini: not implemented yet"))
    }

    async fn status(
        &self,
        _task: &ProviderTask,
        _traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        Err(ProviderError::permanent("gemini: not implemented yet"))
    }

    async fn cancel(&self, _task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        Err(ProviderError::permanent("gemini: not implemented yet"))
    }
}
