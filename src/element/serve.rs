//! Answering the element host: the installed release's files with caching (ETags, revalidation),
//! precompressed encodings and Element's security headers.

use super::*;

impl Element {
    /// Answers one request on the element host.
    pub async fn serve(&self, method: &Method, path: &str, headers: &HeaderMap) -> Response<Bytes> {
        let mut resp = self.respond(method, path, headers).await;
        let h = resp.headers_mut();
        h.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("strict-origin-when-cross-origin"),
        );
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        if method == Method::HEAD {
            // RFC 9110 §9.3.2: the headers a GET would have, including its length.
            let len = HeaderValue::from(resp.body().len());
            resp.headers_mut().insert(header::CONTENT_LENGTH, len);
            *resp.body_mut() = Bytes::new();
        }
        resp
    }

    async fn respond(&self, method: &Method, path: &str, headers: &HeaderMap) -> Response<Bytes> {
        if method != Method::GET && method != Method::HEAD {
            let mut r = simple(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET or HEAD only\n",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let Some(key) = tree::key_for(path) else {
            return not_found();
        };
        // Element asks for config.<hostname>.json first and falls back to config.json only on
        // a 404 (element-web docs/config.md), so only config.json exists here.
        if key == "config.json" {
            let cj = self.config_json.load();
            return representation(
                &cj.1,
                CacheClass::Revalidate,
                "application/json",
                false,
                Encoding::Identity,
                cj.0.clone(),
            );
        }
        if key.starts_with("config.") && key.ends_with(".json") {
            return not_found();
        }
        let Some(current) = self.current.load_full() else {
            return installing_page();
        };
        let mut tree = current;
        if tree.entry(&key).is_none()
            && key.starts_with("bundles/")
            && let Some(prev) = self.previous.load_full()
        {
            tree = prev;
        }
        let Some(entry) = tree.entry(&key) else {
            return not_found();
        };
        let enc = negotiate(headers, entry.br.is_some(), entry.gz.is_some());
        let etag = match enc.token() {
            None => format!("\"{}\"", &entry.sha256[..32]),
            Some(t) => format!("\"{}-{t}\"", &entry.sha256[..32]),
        };
        let varies = entry.br.is_some() || entry.gz.is_some();
        if if_none_match(headers, &etag) {
            return not_modified(&etag, CacheClass::of(&key), varies);
        }
        let body = match tree.read(&key, enc).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(file = %key, version = %tree.version, "reading an Element file: {e}");
                return simple(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "this file could not be read; see the server log\n",
                );
            }
        };
        representation(
            &etag,
            CacheClass::of(&key),
            tree::content_type(&key),
            varies,
            enc,
            body,
        )
    }
}

/// Element's hosting advice (element-web README, "Important Security Notes") plus the policy
/// of its own index.html meta CSP, with `frame-ancestors 'self'` added; Element's crypto is
/// wasm, hence `'wasm-unsafe-eval'`.
pub const CSP: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self' 'wasm-unsafe-eval' https://www.recaptcha.net https://www.gstatic.com; img-src * blob: data:; connect-src * blob: data:; font-src 'self' data:; media-src * blob: data:; child-src * blob: data:; worker-src 'self' blob:; frame-src * blob: data:; form-action 'self'; manifest-src 'self'; frame-ancestors 'self'";

/// Picks br, then gzip, then the identity (RFC 9110 §12.5.3); `q=0` refuses a coding.
pub fn negotiate(headers: &HeaderMap, has_br: bool, has_gz: bool) -> Encoding {
    // A coding named explicitly wins over `*` (RFC 9110 §12.5.3).
    let (mut br, mut gz, mut star) = (None, None, None);
    for v in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(s) = v.to_str() else { continue };
        for item in s.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .filter_map(|q| q.trim().parse::<f32>().ok())
                .next()
                .unwrap_or(1.0);
            let ok = Some(q > 0.0);
            match coding.as_str() {
                "br" => br = ok,
                "gzip" | "x-gzip" => gz = ok,
                "*" => star = ok,
                _ => {}
            }
        }
    }
    let star = star.unwrap_or(false);
    if br.unwrap_or(star) && has_br {
        Encoding::Brotli
    } else if gz.unwrap_or(star) && has_gz {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

/// RFC 9110 §13.1.2: weak comparison, `*` matches any current representation.
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                let t = t.trim();
                t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag
            })
        })
    })
}

fn representation(
    etag: &str,
    class: CacheClass,
    ctype: &'static str,
    varies: bool,
    enc: Encoding,
    body: Bytes,
) -> Response<Bytes> {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(class.header()),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    if varies {
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    if let Some(t) = enc.token() {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(t));
    }
    r
}

fn not_modified(etag: &str, class: CacheClass, varies: bool) -> Response<Bytes> {
    let mut r = Response::new(Bytes::new());
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(class.header()),
    );
    if varies {
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    r
}

fn simple(status: StatusCode, ctype: &'static str, body: &'static str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from_static(body.as_bytes()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn not_found() -> Response<Bytes> {
    simple(StatusCode::NOT_FOUND, "text/plain", "not found\n")
}

/// Shown until the first release is installed (an offline build fetches one on first start).
fn installing_page() -> Response<Bytes> {
    let mut r = simple(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/html; charset=utf-8",
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"15\"><title>Element is being installed</title></head><body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>Element is being installed</h1><p>The web client is being downloaded and checked; this page reloads by itself. Meanwhile, any Matrix client works with this server. <code>homelab-matrix status</code> shows the progress.</p></body></html>\n",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("15"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ae(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn encoding_negotiation_prefers_br_and_honours_q0() {
        assert_eq!(
            negotiate(&ae("gzip, deflate, br, zstd"), true, true),
            Encoding::Brotli
        );
        assert_eq!(
            negotiate(&ae("gzip, deflate, br"), false, true),
            Encoding::Gzip
        );
        assert_eq!(
            negotiate(&ae("gzip;q=0, br;q=0"), true, true),
            Encoding::Identity
        );
        assert_eq!(negotiate(&ae("*"), true, true), Encoding::Brotli);
        assert_eq!(negotiate(&ae("br;q=0, *"), true, true), Encoding::Gzip);
        assert_eq!(negotiate(&HeaderMap::new(), true, true), Encoding::Identity);
    }

    #[test]
    fn etags_match_weakly_and_by_star() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"a\", W/\"b\""),
        );
        assert!(if_none_match(&h, "\"b\""));
        assert!(!if_none_match(&h, "\"c\""));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(if_none_match(&h, "\"c\""));
    }
}
