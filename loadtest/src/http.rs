//! A lean HTTP/1.1 client for load generation.
//!
//! Each [`HttpConnection`] is one keep-alive TCP connection driven by hyper's
//! low-level client, owned by one sender at a time. A general-purpose client
//! (connection pool, redirects, header maps per request) costs CPU that, on a
//! two-core machine, is taken straight from the system being measured, so
//! the generator keeps its per-request work to building one request and
//! reading one body. [`ConnectionPool`] shares connections between the
//! open-loop senders and the HTTP status poller.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Errors talking to the intake.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The base URL is not one this client can use.
    #[error("unusable base URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// Connecting failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The request could not be sent or the response not read (the server
    /// closed the connection, for example).
    #[error("HTTP exchange failed: {0}")]
    Exchange(#[from] hyper::Error),
    /// A request could not be built (a malformed path).
    #[error("cannot build request: {0}")]
    Request(#[from] http::Error),
}

/// A parsed base URL: where to connect and what to put in `Host`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    addr: SocketAddr,
    authority: HeaderValue,
    base_path: String,
    url: String,
}

impl Endpoint {
    /// Parses and resolves an `http://host:port[/base]` URL once, so no
    /// request pays for name resolution.
    ///
    /// # Errors
    /// [`HttpError::BadUrl`] for another scheme, a missing host or a host
    /// that does not resolve.
    pub async fn resolve(url: &str) -> Result<Self, HttpError> {
        let bad = |reason: &str| HttpError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            // The generator measures loopback deployments; TLS would measure
            // the TLS stack instead.
            return Err(bad("only http:// is supported"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| bad(&format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| bad("host resolves to no address"))?;
        let authority =
            HeaderValue::from_str(authority.as_str()).map_err(|_| bad("invalid authority"))?;
        Ok(Self {
            addr,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            url: url.to_owned(),
        })
    }

    /// The URL this endpoint was parsed from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full request path for an API path such as `/tasks`.
    pub fn path(&self, api_path: &str) -> String {
        format!("{}{api_path}", self.base_path)
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct HttpConnection {
    sender: SendRequest<Full<Bytes>>,
    endpoint: Arc<Endpoint>,
}

impl std::fmt::Debug for HttpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConnection")
            .field("addr", &self.endpoint.addr)
            .finish_non_exhaustive()
    }
}

impl HttpConnection {
    /// Opens a connection (with `TCP_NODELAY`: requests are small and
    /// latency is what is measured).
    ///
    /// # Errors
    /// [`HttpError::Connect`] or [`HttpError::Exchange`] when the handshake
    /// fails.
    pub async fn connect(endpoint: Arc<Endpoint>) -> Result<Self, HttpError> {
        let connect_err = |source| HttpError::Connect {
            addr: endpoint.addr.to_string(),
            source,
        };
        let stream = TcpStream::connect(endpoint.addr)
            .await
            .map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection future drives the socket; it ends when the sender is
        // dropped or the server closes, and its error then surfaces on the
        // next request through the sender.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { sender, endpoint })
    }

    /// Sends one request and reads the whole response body.
    ///
    /// # Errors
    /// [`HttpError::Exchange`] when the connection failed; the connection
    /// must then be dropped.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.endpoint.authority.clone());
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let request = builder.body(Full::new(body.unwrap_or_default()))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// Whether the connection can still be used.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// Idle connections shared by concurrent senders: take one (or open a new
/// one), use it, give it back.
#[derive(Debug, Clone)]
pub struct ConnectionPool {
    endpoint: Arc<Endpoint>,
    idle: Arc<Mutex<Vec<HttpConnection>>>,
}

impl ConnectionPool {
    /// An empty pool for `endpoint`.
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        Self {
            endpoint,
            idle: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The endpoint connections go to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// An idle connection, or a new one.
    ///
    /// # Errors
    /// When a new connection cannot be opened.
    pub async fn take(&self) -> Result<HttpConnection, HttpError> {
        let idle = self.lock().pop();
        match idle {
            Some(conn) if conn.is_open() => Ok(conn),
            _ => HttpConnection::connect(self.endpoint.clone()).await,
        }
    }

    /// Returns a connection after a successful exchange.
    pub fn give_back(&self, conn: HttpConnection) {
        if conn.is_open() {
            self.lock().push(conn);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HttpConnection>> {
        // A panic while holding this lock can only come from `Vec::push`
        // running out of memory; the list itself stays consistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}
