//! Reading a request body within limits: at most `max_compressed` bytes off the wire and at most
//! `max_decompressed` bytes after `Content-Encoding: gzip | zstd`. Decompression streams into a
//! buffer that stops one byte past the limit, so a decompression bomb costs bounded memory and
//! time before it is refused with 413.

use std::io::Read;

use axum::body::{to_bytes, Body, Bytes};
use axum::http::HeaderValue;

use crate::error::{IngestError, MalformedBody, UnsupportedMedia};

/// zstd frames may ask for a window up to 2 GiB; refuse anything above 8 MiB so a hostile frame
/// cannot make the decoder allocate more than that.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

/// The body's encoding, from its `Content-Encoding` value (none: identity).
pub fn encoding(content_encoding: Option<&HeaderValue>) -> Result<Encoding, IngestError> {
    let Some(value) = content_encoding else { return Ok(Encoding::Identity) };
    let text = value.to_str().unwrap_or("").trim();
    if text.eq_ignore_ascii_case("identity") || text.is_empty() {
        Ok(Encoding::Identity)
    } else if text.eq_ignore_ascii_case("gzip") || text.eq_ignore_ascii_case("x-gzip") {
        Ok(Encoding::Gzip)
    } else if text.eq_ignore_ascii_case("zstd") {
        Ok(Encoding::Zstd)
    } else {
        Err(IngestError::Unsupported(UnsupportedMedia::Encoding(text.to_owned())))
    }
}

/// Reads `reader` to the end, failing once more than `limit` bytes come out.
fn read_bounded(reader: impl Read, limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::with_capacity(limit.min(1 << 20));
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::Malformed(MalformedBody::Decompress(e)))?;
    if out.len() > limit {
        return Err(IngestError::TooLarge { limit });
    }
    Ok(out)
}

pub fn decode(encoding: Encoding, raw: Bytes, max_decompressed: usize) -> Result<Bytes, IngestError> {
    match encoding {
        Encoding::Identity => {
            if raw.len() > max_decompressed {
                return Err(IngestError::TooLarge { limit: max_decompressed });
            }
            Ok(raw)
        }
        Encoding::Gzip => {
            read_bounded(flate2::read::MultiGzDecoder::new(&raw[..]), max_decompressed).map(Bytes::from)
        }
        Encoding::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(&raw[..])
                .map_err(|e| IngestError::Malformed(MalformedBody::Zstd(e)))?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| IngestError::Malformed(MalformedBody::Zstd(e)))?;
            read_bounded(decoder, max_decompressed).map(Bytes::from)
        }
    }
}

/// Reads and decodes the body. Decompression runs on the blocking pool when the body is large
/// enough that it would stall the async workers.
pub async fn read(
    encoding: Encoding,
    body: Body,
    max_compressed: usize,
    max_decompressed: usize,
) -> Result<Bytes, IngestError> {
    let wire_limit = if encoding == Encoding::Identity { max_decompressed } else { max_compressed };
    let raw = to_bytes(body, wire_limit).await.map_err(|_| IngestError::TooLarge { limit: wire_limit })?;
    if encoding == Encoding::Identity || raw.len() < 64 * 1024 {
        return decode(encoding, raw, max_decompressed);
    }
    tokio::task::spawn_blocking(move || decode(encoding, raw, max_decompressed))
        .await
        .map_err(IngestError::DecompressionTask)?
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Bytes {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        Bytes::from(encoder.finish().unwrap())
    }

    #[test]
    fn round_trips_within_limits() {
        let data = b"{\"events\":[]}".repeat(100);
        assert_eq!(decode(Encoding::Gzip, gzip(&data), data.len()).unwrap(), data);
        let compressed = zstd::encode_all(&data[..], 3).unwrap();
        assert_eq!(decode(Encoding::Zstd, Bytes::from(compressed), data.len()).unwrap(), data);
    }

    #[test]
    fn bombs_are_refused_at_the_limit() {
        // 64 MiB of zeros compress to a few tens of KiB.
        let zeros = vec![0u8; 64 << 20];
        let bomb = gzip(&zeros);
        assert!(bomb.len() < 200 * 1024);
        assert!(matches!(decode(Encoding::Gzip, bomb, 1 << 20), Err(IngestError::TooLarge { .. })));
        let zstd_bomb = Bytes::from(zstd::encode_all(&zeros[..], 3).unwrap());
        assert!(matches!(decode(Encoding::Zstd, zstd_bomb, 1 << 20), Err(IngestError::TooLarge { .. })));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            decode(Encoding::Gzip, Bytes::from_static(b"not gzip"), 100),
            Err(IngestError::Malformed(_))
        ));
        assert!(matches!(
            decode(Encoding::Zstd, Bytes::from_static(b"not zstd"), 100),
            Err(IngestError::Malformed(_))
        ));
    }
}
