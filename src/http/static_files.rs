//! The demo web client: `web/demo/`, compiled into the binary (no files to
//! ship, no build step), served at `/` and `/demo/<asset>`. The page talks
//! to this server only (`/v1`, `/ws`, and `/dev` in `--dev`); the
//! content-security-policy holds it to that, and to no inline script or
//! style, so a message that slipped past the page's escaping still could
//! not run.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode};

use super::{ApiError, Body};

/// One embedded file.
struct Asset {
    content_type: &'static str,
    bytes: &'static [u8],
    /// Of the bytes, fixed at compile time: changes with every build that
    /// changes the file, and only then.
    etag: u64,
}

const fn asset(content_type: &'static str, bytes: &'static [u8]) -> Asset {
    Asset {
        content_type,
        bytes,
        etag: fnv1a(bytes),
    }
}

const INDEX: Asset = asset(
    "text/html; charset=utf-8",
    include_bytes!("../../web/demo/index.html"),
);
const APP_JS: Asset = asset(
    "text/javascript; charset=utf-8",
    include_bytes!("../../web/demo/app.js"),
);
const STYLE_CSS: Asset = asset(
    "text/css; charset=utf-8",
    include_bytes!("../../web/demo/style.css"),
);
const ICON_SVG: Asset = asset("image/svg+xml", include_bytes!("../../web/demo/icon.svg"));

/// Only this origin, nothing inline, no frames, no plugins, no forms
/// posting elsewhere. `connect-src 'self'` covers the page's own `ws://`
/// and `wss://` origin (CSP level 3).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Revalidated on every load (cheap: a 304 by ETag), so a new binary's
/// page is never mixed with an old cached script.
const CACHE_CONTROL_VALUE: &str = "no-cache";

/// `/` and `/demo/<name>`: the asset, 304 if the client has it, 404 for
/// an unknown name, 405 for a method other than GET.
pub(super) fn handle<B>(req: &Request<B>, segments: &[&str]) -> Result<Response<Body>, ApiError> {
    let asset = match segments {
        [""] => &INDEX,
        ["demo", "app.js"] => &APP_JS,
        ["demo", "style.css"] => &STYLE_CSS,
        ["demo", "icon.svg"] => &ICON_SVG,
        _ => return Err(ApiError::NotFound("no such route".into())),
    };
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = req
        .headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let (status, body) = if fresh {
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else {
        (StatusCode::OK, Bytes::from_static(asset.bytes))
    };
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL_VALUE));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    Ok(res)
}

/// FNV-1a, 64 bits: a const fn, so each asset's ETag is computed by the
/// compiler. Not for security; only to tell versions of a file apart.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path_segments: &[&str], if_none_match: Option<&str>) -> Response<Body> {
        let mut req = Request::builder().method(Method::GET).uri("/");
        if let Some(t) = if_none_match {
            req = req.header(IF_NONE_MATCH, t);
        }
        handle(&req.body(()).unwrap(), path_segments).unwrap()
    }

    #[test]
    fn assets_carry_their_type_and_the_security_headers() {
        for (segments, ty) in [
            (&[""][..], "text/html"),
            (&["demo", "app.js"][..], "text/javascript"),
            (&["demo", "style.css"][..], "text/css"),
            (&["demo", "icon.svg"][..], "image/svg+xml"),
        ] {
            let res = get(segments, None);
            assert_eq!(res.status(), StatusCode::OK);
            let h = res.headers();
            assert!(h[CONTENT_TYPE].to_str().unwrap().starts_with(ty));
            assert_eq!(h["x-content-type-options"], "nosniff");
            assert_eq!(h["content-security-policy"], CONTENT_SECURITY_POLICY);
            assert_eq!(h[CACHE_CONTROL], "no-cache");
        }
    }

    #[test]
    fn a_matching_etag_is_answered_304_without_a_body() {
        let etag = get(&[""], None).headers()[ETAG]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(get(&[""], Some(&etag)).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(get(&[""], Some("\"other\"")).status(), StatusCode::OK);
        assert_ne!(INDEX.etag, APP_JS.etag);
    }

    #[test]
    fn unknown_assets_are_404_and_other_methods_405() {
        let req = Request::builder().uri("/demo/x").body(()).unwrap();
        assert!(matches!(
            handle(&req, &["demo", "x"]),
            Err(ApiError::NotFound(_))
        ));
        let post = Request::builder()
            .method(Method::POST)
            .uri("/")
            .body(())
            .unwrap();
        assert!(matches!(
            handle(&post, &[""]),
            Err(ApiError::MethodNotAllowed)
        ));
    }
}
