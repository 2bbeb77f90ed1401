//! What the two Google Veo protocols ([`super::vertex_veo`], [`super::gemini`]) share: the
//! long-running operation envelope (`google.longrunning.Operation`) and its error
//! (`google.rpc.Status`), how a finished video result becomes a [`ProviderStatus`], operation
//! names, and the request parameters Veo takes.
//!
//! An operation has no status enum: `done` (omitted while false, as proto3 JSON does) and then
//! exactly one of `error` or `response`. Sources: the Vertex AI REST reference
//! (`projects.locations.publishers.models.fetchPredictOperation` answers an `Operation`), the
//! Gemini API REST samples (`jq .done`, then `.response.generateVideoResponse…`), and the
//! google-genai Python SDK (`operations.py`, `models.py` `_GenerateVideosOperation_from_*`).

use serde::Deserialize;

use super::transport::{bad_body, unknown_status};
use super::{ProviderError, ProviderState, ProviderStatus, ProviderTask, SubmitRequest};
use crate::messages::truncate;

/// `google.rpc.Status`: the `error` of a finished operation.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RpcStatus {
    /// A `google.rpc.Code` (1 is `CANCELLED`).
    #[serde(default)]
    pub(crate) code: Option<i64>,
    #[serde(default)]
    pub(crate) message: Option<String>,
    /// The code's name (`INVALID_ARGUMENT`), in HTTP error bodies.
    #[serde(default)]
    pub(crate) status: Option<String>,
}

/// `google.longrunning.Operation`, reduced to what we use.
#[derive(Debug, Deserialize)]
pub(crate) struct LongRunningOperation {
    /// Always present in an operation (an object without it is not one).
    pub(crate) name: String,
    /// Omitted while false.
    #[serde(default)]
    pub(crate) done: Option<bool>,
    #[serde(default)]
    pub(crate) error: Option<RpcStatus>,
    #[serde(default)]
    pub(crate) response: Option<serde_json::Value>,
}

/// Where an operation is.
pub(crate) enum Stage<'a> {
    /// `done` is false or absent.
    Running,
    /// Finished with `error`.
    Failed(&'a RpcStatus),
    /// Finished with `response`.
    Finished(&'a serde_json::Value),
}

impl LongRunningOperation {
    /// Parses an operation body; `what` names it in errors.
    pub(crate) fn parse(what: &str, body: &[u8]) -> Result<Self, ProviderError> {
        // An object first: serde would also take a JSON array for a struct.
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(body).map_err(|e| bad_body(what, body, &e))?;
        serde_json::from_value(serde_json::Value::Object(object))
            .map_err(|e| bad_body(what, body, &e))
    }

    /// The operation's stage; a finished operation with neither `error` nor `response` is not
    /// something the protocol allows: a transient error (logged) so that the next check asks
    /// again.
    pub(crate) fn stage(&self, provider: &str) -> Result<Stage<'_>, ProviderError> {
        if !self.done.unwrap_or(false) {
            return Ok(Stage::Running);
        }
        match (&self.error, &self.response) {
            (Some(error), _) => Ok(Stage::Failed(error)),
            (None, Some(response)) => Ok(Stage::Finished(response)),
            (None, None) => Err(unknown_status(
                provider,
                &self.name,
                "done without error or response",
                "not done, or done with an error or a response",
            )),
        }
    }
}

/// A running operation: Veo reports no progress.
pub(crate) fn running() -> ProviderStatus {
    ProviderStatus {
        state: ProviderState::InProgress,
        progress: None,
        video_url: None,
        video_url_expires_at: None,
        video_seconds: None,
        error: None,
    }
}

/// A finished operation's `error`: `CANCELLED` (code 1, what a cancelled operation carries) is
/// [`ProviderState::Cancelled`], anything else [`ProviderState::Failed`].
pub(crate) fn failed(error: &RpcStatus) -> ProviderStatus {
    let cancelled = error.code == Some(1) || error.status.as_deref() == Some("CANCELLED");
    let message = error
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map_or_else(
            || match (error.code, error.status.as_deref()) {
                (Some(code), Some(name)) => format!("operation failed with code {code} ({name})"),
                (Some(code), None) => format!("operation failed with code {code}"),
                (None, Some(name)) => format!("operation failed ({name})"),
                (None, None) => "operation failed (no error message given)".to_owned(),
            },
            |m| truncate(m, 1000),
        );
    ProviderStatus {
        state: if cancelled {
            ProviderState::Cancelled
        } else {
            ProviderState::Failed
        },
        progress: None,
        video_url: None,
        video_url_expires_at: None,
        video_seconds: None,
        error: Some(message),
    }
}

/// One generated video of a finished operation.
pub(crate) enum GeneratedVideo {
    /// Where it was written (`gs://…` on Vertex, a Files API URI on the Gemini API).
    Uri(String),
    /// Returned as base64 bytes in the answer.
    Inline,
    /// Neither (an empty entry).
    Empty,
}

/// The result of a finished operation, in either protocol's terms.
pub(crate) struct VideoResult {
    pub(crate) videos: Vec<GeneratedVideo>,
    /// `raiMediaFilteredCount`: videos withheld by the Responsible AI filters.
    pub(crate) filtered_count: u64,
    /// `raiMediaFilteredReasons`.
    pub(crate) filtered_reasons: Vec<String>,
}

impl VideoResult {
    /// Reads `raiMediaFilteredCount` (a number, or a string as int64 may be) and
    /// `raiMediaFilteredReasons` from `object`, with `videos` already read.
    pub(crate) fn with_filters(videos: Vec<GeneratedVideo>, object: &serde_json::Value) -> Self {
        let filtered_count = match object.get("raiMediaFilteredCount") {
            Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(0),
            Some(serde_json::Value::String(s)) => s.trim().parse().unwrap_or(0),
            _ => 0,
        };
        let filtered_reasons = object
            .get("raiMediaFilteredReasons")
            .and_then(serde_json::Value::as_array)
            .map(|reasons| {
                reasons
                    .iter()
                    .filter_map(serde_json::Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Self {
            videos,
            filtered_count,
            filtered_reasons,
        }
    }

    /// The job's status: the first video with a URI is the result; inline bytes are refused
    /// with `inline_error`; no video at all is a failure naming the filter's reasons when the
    /// filter withheld them.
    pub(crate) fn into_status(self, inline_error: &str) -> ProviderStatus {
        let mut status = running();
        if let Some(uri) = self.videos.iter().find_map(|video| match video {
            GeneratedVideo::Uri(uri) => Some(uri.clone()),
            GeneratedVideo::Inline | GeneratedVideo::Empty => None,
        }) {
            status.state = ProviderState::Succeeded;
            status.progress = Some(100);
            status.video_url = Some(uri);
            return status;
        }
        status.state = ProviderState::Failed;
        let inline = self
            .videos
            .iter()
            .any(|video| matches!(video, GeneratedVideo::Inline));
        status.error = Some(if inline {
            inline_error.to_owned()
        } else if self.filtered_count > 0 || !self.filtered_reasons.is_empty() {
            let count = self.filtered_count.max(1);
            let noun = if count == 1 { "video" } else { "videos" };
            if self.filtered_reasons.is_empty() {
                format!("Veo's Responsible AI filters withheld {count} {noun} (no reason given)")
            } else {
                truncate(
                    &format!(
                        "Veo's Responsible AI filters withheld {count} {noun}: {}",
                        self.filtered_reasons.join("; ")
                    ),
                    1000,
                )
            }
        } else {
            "the operation finished without a video".to_owned()
        });
        status
    }
}

/// The `{name}` answering `predictLongRunning`: the operation's name is the task id.
/// `valid` checks the name's shape.
pub(crate) fn created_operation(
    what: &str,
    body: &[u8],
    valid: impl Fn(&str) -> bool,
) -> Result<ProviderTask, ProviderError> {
    #[derive(Deserialize)]
    struct Created {
        name: String,
    }
    let Created { name } = serde_json::from_slice(body).map_err(|e| bad_body(what, body, &e))?;
    if !valid(&name) {
        return Err(ProviderError::permanent(format!(
            "{what}: unexpected operation name \"{}\"",
            truncate(&name, 200)
        )));
    }
    Ok(ProviderTask { id: name })
}

/// The variable segments of `name` when it has the shape `pattern` (`*` for a variable segment,
/// anything else literal), e.g. `models/*/operations/*`; `None` otherwise. Variable segments
/// must be non-empty; they are returned unescaped.
pub(crate) fn match_name<'a>(name: &'a str, pattern: &str) -> Option<Vec<&'a str>> {
    let segments: Vec<&str> = name.split('/').collect();
    let expected: Vec<&str> = pattern.split('/').collect();
    if segments.len() != expected.len() {
        return None;
    }
    let mut variables = Vec::new();
    for (segment, expected) in segments.into_iter().zip(expected) {
        if expected == "*" {
            if segment.is_empty() {
                return None;
            }
            variables.push(segment);
        } else if segment != expected {
            return None;
        }
    }
    Some(variables)
}

/// The `parameters` Veo takes from a request, in both protocols (the Vertex model reference's
/// `parameters` and the Gemini API's parameter table): one video (`sampleCount: 1`), the
/// length (`durationSeconds`, a number as the SDKs send it), and from `size` the aspect ratio
/// (`16:9` or `9:16`, the only two) and the resolution (`1080p`, `4k`; 720p is the default and
/// is not sent, so models without the `resolution` parameter still accept it).
///
/// # Errors
/// Permanent when `size` is not `WxH` or not a size Veo renders.
pub(crate) fn veo_parameters(
    request: &SubmitRequest,
) -> Result<serde_json::Map<String, serde_json::Value>, ProviderError> {
    let mut parameters = serde_json::Map::new();
    parameters.insert("sampleCount".to_owned(), 1.into());
    if let Some(seconds) = request.duration_seconds {
        parameters.insert("durationSeconds".to_owned(), seconds.into());
    }
    if let Some(size) = request.size.as_deref() {
        let (aspect_ratio, resolution) = veo_size(size)?;
        parameters.insert("aspectRatio".to_owned(), aspect_ratio.into());
        if let Some(resolution) = resolution {
            parameters.insert("resolution".to_owned(), resolution.into());
        }
    }
    Ok(parameters)
}

/// `1280x720` → (`16:9`, None); `1080x1920` → (`9:16`, `1080p`); `3840x2160` → (`16:9`, `4k`).
fn veo_size(size: &str) -> Result<(&'static str, Option<&'static str>), ProviderError> {
    let unsupported = || {
        ProviderError::permanent(format!(
            "size \"{}\" is not one Veo renders: 16:9 or 9:16 at 720p, 1080p or 4k (e.g. 1280x720, 720x1280, 1920x1080)",
            truncate(size, 40)
        ))
    };
    let (width, height) = size
        .trim()
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse::<u64>().ok()?, h.trim().parse::<u64>().ok()?)))
        .ok_or_else(unsupported)?;
    let aspect_ratio = if width * 9 == height * 16 {
        "16:9"
    } else if width * 16 == height * 9 {
        "9:16"
    } else {
        return Err(unsupported());
    };
    let resolution = match width.min(height) {
        720 => None,
        1080 => Some("1080p"),
        2160 => Some("4k"),
        _ => return Err(unsupported()),
    };
    Ok((aspect_ratio, resolution))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_map_to_aspect_ratio_and_resolution() {
        assert_eq!(veo_size("1280x720").expect("720p"), ("16:9", None));
        assert_eq!(veo_size("720x1280").expect("portrait"), ("9:16", None));
        assert_eq!(
            veo_size("1920x1080").expect("1080p"),
            ("16:9", Some("1080p"))
        );
        assert_eq!(veo_size("2160x3840").expect("4k"), ("9:16", Some("4k")));
        for bad in ["1024x1024", "640x360", "wide", "1280x", "0x0"] {
            let error = veo_size(bad).expect_err(bad);
            assert!(!error.is_transient(), "{error}");
            assert!(error.to_string().contains("16:9 or 9:16"), "{error}");
        }
    }

    #[test]
    fn names_match_patterns_segment_by_segment() {
        assert_eq!(
            match_name("models/veo/operations/abc", "models/*/operations/*"),
            Some(vec!["veo", "abc"])
        );
        assert_eq!(
            match_name("models//operations/abc", "models/*/operations/*"),
            None
        );
        assert_eq!(
            match_name("models/veo/operations/abc/x", "models/*/operations/*"),
            None
        );
        assert_eq!(
            match_name("tunedModels/veo/operations/abc", "models/*/operations/*"),
            None
        );
    }

    #[test]
    fn a_cancelled_error_is_cancelled_and_an_empty_message_falls_back_to_the_code() {
        let cancelled = failed(&RpcStatus {
            code: Some(1),
            message: Some("Operation cancelled.".to_owned()),
            status: None,
        });
        assert_eq!(cancelled.state, ProviderState::Cancelled);
        let bare = failed(&RpcStatus {
            code: Some(13),
            message: Some(String::new()),
            status: None,
        });
        assert_eq!(bare.state, ProviderState::Failed);
        assert_eq!(bare.error.as_deref(), Some("operation failed with code 13"));
    }
}
