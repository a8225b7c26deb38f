//! How each of the daemon's errors answers over HTTP: its status code.

use axum::http::StatusCode;

use super::ApiError;
use crate::daemon::attach::AttachError;
use crate::daemon::commit::CommitError;
use crate::daemon::fill::FillError;
use crate::daemon::resize::ResizeError;
use crate::daemon::sandboxes::SandboxError;
use crate::daemon::templates::TemplateError;

impl From<FillError> for ApiError {
    fn from(e: FillError) -> ApiError {
        match e {
            FillError::Template(n) => n.into(),
            other @ FillError::OverBudget { .. } => {
                ApiError(StatusCode::INSUFFICIENT_STORAGE, other.to_string())
            }
        }
    }
}

fn sandbox_status(e: &SandboxError) -> StatusCode {
    match e {
        SandboxError::InvalidId(_) => StatusCode::BAD_REQUEST,
        SandboxError::Exists(_)
        | SandboxError::NameTaken(_)
        | SandboxError::InUse { .. }
        | SandboxError::Committing { .. }
        | SandboxError::Reserved(_) => StatusCode::CONFLICT,
        SandboxError::Unknown(_) => StatusCode::NOT_FOUND,
        SandboxError::Template(n) => template_error_status(n),
        SandboxError::Overlay(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> ApiError {
        ApiError(sandbox_status(&e), e.to_string())
    }
}

impl From<CommitError> for ApiError {
    fn from(e: CommitError) -> ApiError {
        let status = match &e {
            CommitError::InvalidId(_) | CommitError::InvalidLabel(_) => StatusCode::BAD_REQUEST,
            CommitError::Exists(_) => StatusCode::CONFLICT,
            CommitError::Sandbox(s) => sandbox_status(s),
            CommitError::Template(n) => template_error_status(n),
            CommitError::Publish { .. } => StatusCode::BAD_GATEWAY,
            CommitError::PublishUncertain { .. } => StatusCode::GATEWAY_TIMEOUT,
            CommitError::Local { .. } | CommitError::Intent { .. } => {
                StatusCode::INSUFFICIENT_STORAGE
            }
        };
        ApiError(status, e.to_string())
    }
}

impl From<AttachError> for ApiError {
    fn from(e: AttachError) -> ApiError {
        ApiError(e.status(), e.to_string())
    }
}

impl From<ResizeError> for ApiError {
    fn from(e: ResizeError) -> ApiError {
        let status = match &e {
            ResizeError::InvalidId(_) | ResizeError::BadSize { .. } => StatusCode::BAD_REQUEST,
            ResizeError::Exists(_) => StatusCode::CONFLICT,
            ResizeError::NoFuse => StatusCode::PRECONDITION_FAILED,
            ResizeError::Tool { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ResizeError::Template(n) => template_error_status(n),
            ResizeError::Sandbox(s) => sandbox_status(s),
            ResizeError::Commit(_) => StatusCode::BAD_GATEWAY,
        };
        ApiError(status, e.to_string())
    }
}

fn template_error_status(e: &TemplateError) -> StatusCode {
    match e {
        TemplateError::UnknownTemplate(..) => StatusCode::NOT_FOUND,
        TemplateError::StoreUnavailable { .. } => StatusCode::BAD_GATEWAY,
        TemplateError::InUse { .. } => StatusCode::CONFLICT,
        TemplateError::Untrusted(_) => StatusCode::FORBIDDEN,
        TemplateError::SaveManifest { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> ApiError {
        ApiError(template_error_status(&e), e.to_string())
    }
}
