//! `tapir state`: reading a state blob from a file, bounded by the largest valid blob.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Reads the blob at `path`: at most [`tapir_state::MAX_BLOB`] bytes. A longer input (or an
/// endless one, such as `/dev/zero`) is refused after reading one byte more than that, so
/// that no input can make the command allocate without bound.
pub fn read_blob(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let limit = u64::try_from(tapir_state::MAX_BLOB).unwrap_or(u64::MAX);
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() > tapir_state::MAX_BLOB {
        bail!(
            "{} is larger than the largest valid snapshot ({} bytes): not a tapir state blob",
            path.display(),
            tapir_state::MAX_BLOB
        );
    }
    Ok(bytes)
}
