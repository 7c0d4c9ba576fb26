//! `GET /dashboard`: the usage dashboard (issue 16), a page of plain HTML, CSS and JavaScript built
//! into the binary (`query-api/dashboard/`), so nothing is loaded from anywhere else at run time.
//! The page reads the same org-scoped routes as any client, with the key the user signs in with;
//! these routes serve only the files and need no key.

use axum::http::header::{
    HeaderName, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page may load only its own script and style and talk only to this server.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                      img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, &'static str); 6] = [
        (CONTENT_TYPE, content_type),
        (CACHE_CONTROL, "no-cache"),
        (CONTENT_SECURITY_POLICY, POLICY),
        (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (REFERRER_POLICY, "no-referrer"),
        (X_FRAME_OPTIONS, "DENY"),
    ];
    (headers, body).into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", include_str!("../dashboard/index.html"))
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("../dashboard/app.js"))
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("../dashboard/app.css"))
}

/// The dashboard's routes, to merge into the API's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(style))
}
