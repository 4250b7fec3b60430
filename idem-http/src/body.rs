//! Buffering bodies under a limit, and the layer's response body type.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

use idem_core::BoxError;

/// The body of every response the layer returns: the handler's own body (streamed through
/// untouched when it is not buffered), a replayed body, or a problem document.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body.
pub(crate) fn full(bytes: Bytes) -> ResponseBody {
    UnsyncBoxBody::new(Full::new(bytes).map_err(|never| match never {}))
}

/// Boxes any body into a [`ResponseBody`].
pub(crate) fn boxed<B>(body: B) -> ResponseBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    UnsyncBoxBody::new(body.map_err(Into::into))
}

/// What reading a body under a limit gave.
pub(crate) enum Buffered<B> {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// The body is longer than the limit: what was read so far, and the rest, unread.
    Over { prefix: Bytes, rest: B },
}

/// Reads `body` to its end, or until more than `limit` bytes have arrived. Trailers are
/// dropped.
pub(crate) async fn read_limited<B>(mut body: B, limit: usize) -> Result<Buffered<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.size_hint().lower() > limit as u64 {
        return Ok(Buffered::Over {
            prefix: Bytes::new(),
            rest: body,
        });
    }
    // The first data frame is kept as it is: a body of one frame (the common case) is not
    // copied.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let len = match first.take() {
            None if buf.is_empty() => {
                let len = data.len();
                first = Some(data);
                len
            }
            prev => {
                if let Some(prev) = prev {
                    buf.extend_from_slice(&prev);
                }
                buf.extend_from_slice(&data);
                buf.len()
            }
        };
        if len > limit {
            let prefix = match first.take() {
                Some(first) => first,
                None => buf.freeze(),
            };
            return Ok(Buffered::Over { prefix, rest: body });
        }
    }
    Ok(Buffered::Complete(match first {
        Some(first) => first,
        None => buf.freeze(),
    }))
}

/// A body that yields `prefix` and then the rest of a partly read body.
pub(crate) struct Prefixed<B> {
    prefix: Option<Bytes>,
    rest: B,
}

impl<B> Prefixed<B> {
    pub(crate) fn new(prefix: Bytes, rest: B) -> Self {
        Prefixed {
            prefix: Some(prefix).filter(|p| !p.is_empty()),
            rest,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let inner = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(extra));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(extra));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use super::*;

    /// A body of chunks with no size hint, like a streamed response.
    struct Chunks(VecDeque<&'static [u8]>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|c| Ok(Frame::data(Bytes::from_static(c)))),
            )
        }
    }

    async fn all<B: Body<Data = Bytes>>(body: B) -> Vec<u8> {
        match body.collect().await {
            Ok(c) => c.to_bytes().to_vec(),
            Err(_) => panic!("body failed"),
        }
    }

    #[tokio::test]
    async fn reads_within_and_over_the_limit() {
        let within = read_limited(Chunks(VecDeque::from([&b"hel"[..], b"lo"])), 5).await;
        assert!(matches!(within, Ok(Buffered::Complete(b)) if &b[..] == b"hello"));

        let over = read_limited(Chunks(VecDeque::from([&b"hel"[..], b"lo", b"!!", b"?"])), 4).await;
        let Ok(Buffered::Over { prefix, rest }) = over else {
            panic!("expected an oversized body");
        };
        assert_eq!(&prefix[..], b"hello");
        assert_eq!(all(Prefixed::new(prefix, rest)).await, b"hello!!?");

        // An exact size hint over the limit is refused before anything is read.
        let sized = read_limited(Full::new(Bytes::from_static(b"hello!")), 5).await;
        let Ok(Buffered::Over { prefix, rest }) = sized else {
            panic!("expected an oversized body");
        };
        assert!(prefix.is_empty());
        assert_eq!(all(Prefixed::new(prefix, rest)).await, b"hello!");
    }
}
