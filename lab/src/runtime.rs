//! The lab is synchronous; its calls to the API server are not. One small runtime per call
//! site keeps the two apart.

use crate::LabError;

/// Runs `f` to completion on a runtime of its own.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, LabError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LabError::sys("starting a runtime for the API calls", e))?;
    Ok(rt.block_on(f))
}
