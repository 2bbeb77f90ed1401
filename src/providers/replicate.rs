//! Replicate's predictions API.
//!
//! - submit: `POST /v1/predictions` with `{version, input: {prompt, duration?}}`. The generic
//!   endpoint's `version` accepts a version id, `owner/name` or `owner/name:version`, so the
//!   model string is sent as is;
//! - status: `GET /v1/predictions/{id}`, whose `status` is `starting`, `processing`, `succeeded`,
//!   `failed`, `canceled` or `aborted` (deadline passed before it started); `output` is a URL or a
//!   list of URLs (we take the first);
//! - cancel: `POST /v1/predictions/{id}/cancel`.
//!
//! Replicate reports no percentage. Many models print one in their `logs` (tqdm bars such as
//! ` 45%|████▌     | 45/100`, or `progress: 45%`), so progress is the last such percentage in the
//! logs, and `None` when there is none: the caller then estimates from elapsed time.
//!
//! Output files of API predictions are deleted an hour after completion, so on success we report
//! `video_url_expires_at = completed_at + 1 h`.

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde::Deserialize;

use super::transport::{bad_body, path_segment, unknown_status, HttpTransport, Operation, Request};
use super::{
    CancelOutcome, ProviderConfigError, ProviderError, ProviderSettings, ProviderState,
    ProviderStatus, ProviderTask, SubmitRequest, VideoProvider,
};

/// How long Replicate keeps the output files of an API prediction after it completes.
pub const OUTPUT_RETENTION: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// A provider speaking Replicate's predictions API.
#[derive(Debug)]
pub struct ReplicateProvider {
    transport: HttpTransport,
}

impl ReplicateProvider {
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

/// The prediction object, reduced to what we use.
#[derive(Debug, Deserialize)]
struct Prediction {
    id: String,
    status: String,
    #[serde(default)]
    output: Option<serde_json::Value>,
    /// A string in practice; kept general so an object does not fail the whole parse.
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    logs: Option<String>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    completed_at: Option<String>,
}

/// Parses a prediction object (the body of `GET /v1/predictions/{id}`).
///
/// # Errors
/// [`ProviderError::Permanent`] describing the problem when the body is not a prediction object;
/// transient (and logged) when its `status` is not one of the documented values.
pub fn parse_prediction(body: &[u8]) -> Result<ProviderStatus, ProviderError> {
    let prediction: Prediction =
        serde_json::from_slice(body).map_err(|e| bad_body("replicate prediction", body, &e))?;
    let state = match prediction.status.as_str() {
        "starting" => ProviderState::Queued,
        "processing" => ProviderState::InProgress,
        "succeeded" => ProviderState::Succeeded,
        // `aborted`: the deadline passed before it started; not something the user asked for.
        "failed" | "aborted" => ProviderState::Failed,
        "canceled" | "cancelled" => ProviderState::Cancelled,
        other => {
            return Err(unknown_status(
                "replicate",
                &prediction.id,
                other,
                "starting, processing, succeeded, failed, canceled or aborted",
            ))
        }
    };
    let progress = match state {
        ProviderState::Succeeded => Some(100),
        _ => prediction.logs.as_deref().and_then(last_log_percentage),
    };
    let video_url = if state == ProviderState::Succeeded {
        first_url(prediction.output.as_ref())
    } else {
        None
    };
    let completed_at = prediction
        .completed_at
        .as_deref()
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .map(|at| at.with_timezone(&Utc));
    let video_url_expires_at = video_url
        .as_ref()
        .and(completed_at)
        .map(|at| at + OUTPUT_RETENTION);
    // The clip length the model was asked for; Replicate reports nothing else about the output.
    let video_seconds = prediction
        .input
        .as_ref()
        .and_then(|input| input.get("duration"))
        .and_then(serde_json::Value::as_f64);
    let error = match state {
        ProviderState::Failed => Some(match prediction.error {
            Some(serde_json::Value::String(text)) if !text.is_empty() => text,
            Some(serde_json::Value::Null | serde_json::Value::String(_)) | None => {
                if prediction.status == "aborted" {
                    "prediction aborted: its deadline passed before it started".to_owned()
                } else {
                    "prediction failed (no error given)".to_owned()
                }
            }
            Some(other) => other.to_string(),
        }),
        _ => None,
    };
    Ok(ProviderStatus {
        state,
        progress,
        video_url,
        video_url_expires_at,
        video_seconds,
        error,
    })
}

/// `output` is model-defined: a URL string, or a list whose first element is the URL.
fn first_url(output: Option<&serde_json::Value>) -> Option<String> {
    match output? {
        serde_json::Value::String(url) => Some(url.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find_map(|item| item.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// The last progress percentage in a model's logs: a tqdm bar (`45%|`) or a labelled
/// `progress: 45%` (case-insensitive). Other percentages (`GPU memory 80%`) are ignored.
///
/// Scans backwards because only the last one matters and logs grow over the job's life.
#[must_use]
pub fn last_log_percentage(logs: &str) -> Option<u8> {
    let bytes = logs.as_bytes();
    for (index, _) in logs.rmatch_indices('%') {
        let mut start = index;
        while start > 0 && (bytes[start - 1].is_ascii_digit() || bytes[start - 1] == b'.') {
            start -= 1;
        }
        if start == index {
            continue;
        }
        let Ok(value) = logs[start..index].parse::<f64>() else {
            continue;
        };
        if !(0.0..=100.0).contains(&value) {
            continue;
        }
        let tqdm = bytes.get(index + 1) == Some(&b'|');
        let label = logs[..start]
            .trim_end_matches([' ', '\t', ':', '='])
            .as_bytes();
        let labelled =
            label.len() >= 8 && label[label.len() - 8..].eq_ignore_ascii_case(b"progress");
        if tqdm || labelled {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            // 0.0..=100.0 checked above, so the cast is exact.
            return Some(value.floor() as u8);
        }
    }
    None
}

#[async_trait::async_trait]
impl VideoProvider for ReplicateProvider {
    fn name(&self) -> &str {
        self.transport.name()
    }

    async fn submit(&self, request: &SubmitRequest) -> Result<ProviderTask, ProviderError> {
        let mut input = serde_json::json!({ "prompt": request.prompt });
        if let Some(duration) = request.duration_seconds {
            input["duration"] = serde_json::Value::from(duration);
        }
        let body = serde_json::json!({ "version": request.model, "input": input });
        let created = self
            .transport
            .submit(
                "/v1/predictions",
                &body,
                request.traceparent.as_deref(),
                "prediction",
            )
            .await?;
        tracing::debug!(provider = %self.transport.name(), request_id = %request.request_id, prediction_id = %created.id, "prediction submitted");
        Ok(created)
    }

    async fn status(
        &self,
        task: &ProviderTask,
        traceparent: Option<&str>,
    ) -> Result<ProviderStatus, ProviderError> {
        let path = format!("/v1/predictions/{}", path_segment(&task.id));
        self.transport
            .status(&path, traceparent, parse_prediction)
            .await
    }

    async fn cancel(&self, task: &ProviderTask) -> Result<CancelOutcome, ProviderError> {
        let path = format!("/v1/predictions/{}/cancel", path_segment(&task.id));
        self.transport
            .send(Request::new(Operation::Cancel, Method::POST, &path))
            .await?;
        Ok(CancelOutcome::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_percentage_takes_the_last_progress_line() {
        let logs = "loading weights\n  0%|          | 0/50 [00:00<?, ?it/s]\r 12%|█▏        | 6/50\r 46%|████▌     | 23/50 [00:05<00:06, 4.1it/s]\nGPU memory 80%\n";
        assert_eq!(last_log_percentage(logs), Some(46));
        assert_eq!(last_log_percentage("step 3\nProgress: 72.5%\n"), Some(72));
        assert_eq!(last_log_percentage("progress=9%"), Some(9));
        assert_eq!(last_log_percentage("GPU memory 80%\n100 % done"), None);
        assert_eq!(last_log_percentage("weird 250%|"), None);
        assert_eq!(last_log_percentage(""), None);
    }

    #[test]
    fn output_may_be_a_string_or_a_list() {
        let list = serde_json::json!(["https://a/1.mp4", "https://a/2.mp4"]);
        assert_eq!(first_url(Some(&list)).as_deref(), Some("https://a/1.mp4"));
        let one = serde_json::json!("https://a/only.mp4");
        assert_eq!(first_url(Some(&one)).as_deref(), Some("https://a/only.mp4"));
        assert_eq!(first_url(Some(&serde_json::json!({"video": 1}))), None);
        assert_eq!(first_url(None), None);
    }

    #[test]
    fn aborted_is_a_failure_with_an_explanation() {
        let status =
            parse_prediction(br#"{"id":"p","status":"aborted","error":null}"#).expect("parses");
        assert_eq!(status.state, ProviderState::Failed);
        assert!(status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("deadline")));
    }
}
