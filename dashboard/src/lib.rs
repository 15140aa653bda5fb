//! The fleet dashboard: server-rendered pages over the event center's gRPC API, kept live by the
//! center's event stream.
//!
//! It runs beside the operator (`nodekeeper dashboard`, like `kubectl proxy`): on loopback, with
//! the operator's own certificate, so it sees exactly what that identity may see and every action
//! is the center's to allow and to record with that identity as the issuer. The pages work
//! without JavaScript; `app.js` only follows `/live` (server-sent events, one center subscription
//! per open page, resumed from the last cursor after a drop) and re-fetches the page's main part
//! at most once a second while events arrive.
//!
//! Because a loopback server holding a person's credentials is a target for any web page that
//! person visits, it answers only requests addressed to itself by name (no DNS rebinding), and
//! actions need a per-process token in the form and a same-origin `Origin` (no cross-site posts).

mod actions;
mod faults;
mod guards;
mod layout;
mod live;
mod node;
mod overview;
mod rollouts;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tonic::transport::Channel;

/// What every handler shares.
pub struct App {
    pub ch: Channel,
    /// Shown in the header: whose credentials the pages use.
    pub identity: String,
    /// The hosts requests may be addressed to (`127.0.0.1:PORT`, `localhost:PORT`, ...).
    hosts: Vec<String>,
    /// Actions carry it: a page of another origin cannot know it.
    token: String,
    hub: live::Hub,
    /// Main parts rendered for the live refresh in the last second, by path and query: any
    /// number of open pages of one kind cost the center one read a second.
    fragments: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, axum::body::Bytes)>>,
}

type Shared = Arc<App>;

/// A page or an error page; gRPC statuses become pages that say what the center said.
pub(crate) type Page = Result<Response, Error>;

pub(crate) struct Error(StatusCode, String);

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        Error(code, format!("the event center answered: {}", s.message()))
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let title = self.0.canonical_reason().unwrap_or("Error").to_owned();
        let body = maud::html! { p role="alert" { (self.1) } p { a href="/" { "Back to the overview" } } };
        (self.0, layout::html(layout::page(&title, "", body))).into_response()
    }
}

/// The dashboard's routes, for `listen` (the address it is served on).
pub fn router(ch: Channel, identity: String, listen: std::net::SocketAddr) -> Router {
    let port = listen.port();
    let mut hosts = vec![listen.to_string(), format!("localhost:{port}")];
    if listen.ip().is_loopback() {
        hosts.extend([format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
    }
    // The thread RNG is a CSPRNG seeded from the system.
    let token = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
    let app = Arc::new(App { ch, identity, hosts, token, hub: live::Hub::default(), fragments: Default::default() });
    Router::new()
        .route("/", get(overview::page))
        .route("/nodes/{cluster}/{node}", get(node::page))
        .route("/faults", get(faults::list))
        .route("/faults/{id}", get(faults::show))
        .route("/rollouts", get(rollouts::list))
        .route("/rollouts/{name}", get(rollouts::show))
        .route("/guards", get(guards::page))
        .route("/confirm", get(actions::confirm))
        .route("/act", axum::routing::post(actions::act))
        .route("/live", get(live::stream))
        .route("/assets/app.js", get(|| asset("text/javascript", include_str!("assets/app.js"))))
        .route("/assets/app.css", get(|| asset("text/css", include_str!("assets/app.css"))))
        .route("/favicon.ico", get(|| asset("image/svg+xml", include_str!("assets/icon.svg"))))
        .layer(axum::middleware::from_fn_with_state(app.clone(), fragments))
        .layer(tower_http::compression::CompressionLayer::new())
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Serves the dashboard on `listener` until `shutdown` completes.
pub async fn serve(
    ch: Channel,
    identity: String,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(ch, identity, listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

/// Requests must name this server (no DNS rebinding); every answer forbids framing and anything
/// but our own scripts and styles.
async fn guard(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if !app.hosts.iter().any(|h| h == host) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "this dashboard answers only requests addressed to it by its own address\n",
        )
            .into_response();
    }
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    r
}

/// How long a rendered main part serves every live refresh of its page.
const FRAGMENT_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The live refreshes (`?fragment=1`) of one page within a second share one rendering.
async fn fragments(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let key = req.uri().to_string();
    if req.method() != axum::http::Method::GET || !req.uri().query().is_some_and(|q| q.contains("fragment=")) {
        return next.run(req).await;
    }
    let hit = {
        let mut cache = app.fragments.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, (at, _)| at.elapsed() < FRAGMENT_TTL);
        cache.get(&key).map(|(_, body)| body.clone())
    };
    if let Some(body) = hit {
        return ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    }
    let r = next.run(req).await;
    if r.status() != StatusCode::OK {
        return r;
    }
    let (parts, body) = r.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 << 20).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    app.fragments.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (std::time::Instant::now(), bytes.clone()));
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// `?fragment=1`: only the page's main part, for the live refresh.
#[derive(serde::Deserialize, Default)]
pub(crate) struct Fragment {
    #[serde(default)]
    fragment: Option<String>,
}

impl Fragment {
    pub(crate) fn only_main(&self) -> bool {
        self.fragment.is_some()
    }
}
