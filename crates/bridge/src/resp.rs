//! A small Redis client: RESP2 over TCP, for the few commands the bridge
//! sends (AUTH, SELECT, SUBSCRIBE, PSUBSCRIBE, XGROUP, XREADGROUP,
//! XAUTOCLAIM, XACK, PING). Written here rather than taken from a client
//! crate because the bridge needs every read bounded: a reply larger than
//! the bridge would ever publish, or nested deeper than any reply of these
//! commands, is an error, not a buffer that grows with whatever the server
//! (or whatever listens on its port) sends.

use std::time::Duration;

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// A Redis reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None`: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the null array.
    Array(Option<Vec<Value>>),
}

impl Value {
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Bulk(Some(b)) => Some(b),
            Self::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn items(&self) -> &[Value] {
        match self {
            Self::Array(Some(v)) => v,
            _ => &[],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RespError {
    #[error("Redis connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("Redis sent a malformed reply: {0}")]
    Protocol(String),
    #[error("Redis refused {command}: {message}")]
    Refused { command: String, message: String },
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis closed the connection")]
    Closed,
}

/// Where Redis is: `redis://[[user]:password@]host[:port][/db]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password: URLs end up in logs and errors.
        write!(f, "redis://{}:{}/{}", self.host, self.port, self.db)
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = if let Some(r) = s.strip_prefix("redis://") {
            r
        } else if s.starts_with("rediss://") {
            return Err(
                "rediss:// (TLS) is not supported by the bridge: reach Redis over a TLS sidecar (stunnel, a service mesh) with redis://".into(),
            );
        } else {
            return Err(format!(
                "a Redis URL starts with redis://, not {:?}",
                s.chars().take(40).collect::<String>()
            ));
        };
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_owned()), Some(p.to_owned())),
                None => (None, Some(a.to_owned())),
            },
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (
                h,
                d.parse()
                    .map_err(|_| format!("the Redis database must be a number, not {d:?}"))?,
            ),
            None => (hostpart, 0),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse()
                    .map_err(|_| format!("the Redis port must be a number, not {p:?}"))?,
            ),
            _ => (hostport, 6379),
        };
        if host.is_empty() {
            return Err("the Redis URL has no host".into());
        }
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            user,
            password,
            db,
        })
    }
}

/// Limits on what one reply may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest bulk string (a message, or a stream entry's field).
    pub max_bulk: usize,
    /// Most elements in one array (stream entries per read, fields per entry).
    pub max_array: usize,
}

const MAX_DEPTH: usize = 8;
const MAX_LINE: usize = 64 * 1024;

pub struct Conn {
    reader: ConnReader,
    writer: ConnWriter,
}

/// The reading half of a [`Conn`] after [`Conn::into_split`].
pub struct ConnReader {
    reader: BufReader<OwnedReadHalf>,
    limits: Limits,
}

/// The writing half of a [`Conn`] after [`Conn::into_split`].
pub struct ConnWriter(OwnedWriteHalf);

impl ConnReader {
    /// Not cancel-safe (a reply half read is lost): keep it in a task of
    /// its own rather than in a `select!` next to a timer.
    pub async fn read(&mut self) -> Result<Value, RespError> {
        self.value(0).await
    }
}

impl ConnWriter {
    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), RespError> {
        self.0.write_all(&encode(args)).await?;
        Ok(())
    }
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Conn {
    /// Connects, logs in and selects the database, each step within `timeout`.
    pub async fn connect(
        url: &RedisUrl,
        limits: Limits,
        timeout: Duration,
    ) -> Result<Self, RespError> {
        let stream =
            tokio::time::timeout(timeout, TcpStream::connect((url.host.as_str(), url.port)))
                .await
                .map_err(|_| RespError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut conn = Self {
            reader: ConnReader {
                reader: BufReader::new(r),
                limits,
            },
            writer: ConnWriter(w),
        };
        if let Some(password) = &url.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &url.user {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            conn.call_within(&args, timeout).await?;
        }
        if url.db != 0 {
            let db = url.db.to_string();
            conn.call_within(&[b"SELECT", db.as_bytes()], timeout)
                .await?;
        }
        Ok(conn)
    }

    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), RespError> {
        self.writer.send(args).await
    }

    /// Separates reading from writing (pub/sub: replies are read in one
    /// task while another sends PINGs).
    pub fn into_split(self) -> (ConnReader, ConnWriter) {
        (self.reader, self.writer)
    }

    /// Sends a command and reads its reply; a Redis error reply is `Refused`.
    pub async fn call_within(
        &mut self,
        args: &[&[u8]],
        timeout: Duration,
    ) -> Result<Value, RespError> {
        self.send(args).await?;
        let reply = tokio::time::timeout(timeout, self.read())
            .await
            .map_err(|_| RespError::Timeout(timeout))??;
        match reply {
            Value::Error(message) => Err(RespError::Refused {
                command: String::from_utf8_lossy(args[0]).into_owned(),
                message,
            }),
            v => Ok(v),
        }
    }

    /// Reads one reply (or one pushed pub/sub message). Not cancel-safe.
    pub async fn read(&mut self) -> Result<Value, RespError> {
        self.reader.read().await
    }
}

impl ConnReader {
    async fn line(&mut self) -> Result<String, RespError> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(RespError::Closed);
        }
        if !buf.ends_with(b"\r\n") {
            return Err(RespError::Protocol(if buf.len() > MAX_LINE {
                format!("a line over {MAX_LINE} bytes")
            } else {
                "a line without CRLF".into()
            }));
        }
        buf.truncate(buf.len() - 2);
        String::from_utf8(buf).map_err(|_| RespError::Protocol("a line that is not UTF-8".into()))
    }

    fn value(
        &mut self,
        depth: usize,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Value, RespError>> + Send + '_>> {
        Box::pin(async move {
            if depth > MAX_DEPTH {
                return Err(RespError::Protocol(format!(
                    "a reply nested over {MAX_DEPTH} deep"
                )));
            }
            let line = self.line().await?;
            let (tag, rest) = line.split_at(line.len().min(1));
            let int = |s: &str| {
                s.parse::<i64>()
                    .map_err(|_| RespError::Protocol(format!("{s:?} is not an integer")))
            };
            match tag {
                "+" => Ok(Value::Simple(rest.to_owned())),
                "-" => Ok(Value::Error(rest.to_owned())),
                ":" => Ok(Value::Int(int(rest)?)),
                "$" => {
                    let n = int(rest)?;
                    if n < 0 {
                        return Ok(Value::Bulk(None));
                    }
                    let n = n as usize;
                    if n > self.limits.max_bulk {
                        return Err(RespError::Protocol(format!(
                            "a value of {n} bytes, over the bridge's limit of {} (--max-message-bytes)",
                            self.limits.max_bulk
                        )));
                    }
                    let mut buf = vec![0u8; n + 2];
                    self.reader.read_exact(&mut buf).await?;
                    if !buf.ends_with(b"\r\n") {
                        return Err(RespError::Protocol("a value without CRLF".into()));
                    }
                    buf.truncate(n);
                    Ok(Value::Bulk(Some(buf)))
                }
                "*" => {
                    let n = int(rest)?;
                    if n < 0 {
                        return Ok(Value::Array(None));
                    }
                    let n = n as usize;
                    if n > self.limits.max_array {
                        return Err(RespError::Protocol(format!(
                            "an array of {n} elements, over the limit of {}",
                            self.limits.max_array
                        )));
                    }
                    let mut items = Vec::with_capacity(n.min(1024));
                    for _ in 0..n {
                        items.push(self.value(depth + 1).await?);
                    }
                    Ok(Value::Array(Some(items)))
                }
                _ => Err(RespError::Protocol(format!(
                    "unknown reply type {:?}",
                    line.chars().take(16).collect::<String>()
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: RedisUrl = "redis://:s3cret@cache.internal:6380/2".parse().unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.user.clone(),
                u.password.as_deref(),
                u.db
            ),
            ("cache.internal", 6380, None, Some("s3cret"), 2)
        );
        assert_eq!(
            format!("{u}"),
            "redis://cache.internal:6380/2",
            "no password shown"
        );
        let u: RedisUrl = "redis://bridge:pw@10.0.0.1".parse().unwrap();
        assert_eq!((u.user.as_deref(), u.port), (Some("bridge"), 6379));
        for bad in [
            "http://x",
            "rediss://x",
            "redis://",
            "redis://h:port",
            "redis://h/x",
        ] {
            assert!(bad.parse::<RedisUrl>().is_err(), "{bad}");
        }
    }

    async fn parse(bytes: &'static [u8], limits: Limits) -> Result<Value, RespError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(bytes).await.unwrap();
        });
        let url: RedisUrl = format!("redis://{addr}").parse().unwrap();
        let mut c = Conn::connect(&url, limits, Duration::from_secs(2))
            .await
            .unwrap();
        c.read().await
    }

    const LIMITS: Limits = Limits {
        max_bulk: 16,
        max_array: 4,
    };

    #[tokio::test]
    async fn replies_parse_and_every_bound_holds() {
        let v = parse(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$-1\r\n", LIMITS)
            .await
            .unwrap();
        assert_eq!(v.items()[0].as_str(), Some("message"));
        assert_eq!(v.items()[2], Value::Bulk(None));
        assert_eq!(parse(b":-42\r\n", LIMITS).await.unwrap(), Value::Int(-42));
        // Over the limits, or malformed: errors, never a growing buffer.
        for bad in [
            &b"$17\r\n"[..],
            b"*5\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
            b"?x\r\n",
            b":12x\r\n",
            b"$3\r\nabcde",
        ] {
            assert!(
                parse(bad, LIMITS).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
