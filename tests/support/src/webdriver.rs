//! A real browser for tests: Debian's `chromedriver` driving headless `chromium`, both
//! inside a network namespace, spoken to over the W3C WebDriver protocol (JSON over
//! HTTP) from a thread that entered the same namespace, so the test process itself
//! never needs a route into it.
//!
//! Needs root (setns) and the packages `chromium chromium-driver` (scripts/install-deps
//! installs them).

use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// W3C: the key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

type Reply = Result<(u16, String), String>;

/// One request to the thread in the namespace: (method, address, path, headers, body).
struct Req {
    method: String,
    addr: SocketAddr,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<String>,
    reply: mpsc::Sender<Reply>,
}

/// Plain HTTP/1.1 from inside a network namespace (one connection per request).
#[derive(Clone)]
pub struct NsHttp {
    tx: mpsc::Sender<Req>,
}

impl NsHttp {
    pub fn new(ns: &str) -> Self {
        let (tx, rx) = mpsc::channel::<Req>();
        let path = format!("/var/run/netns/{ns}");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a valid namespace fd, for this thread only; the thread
            // then makes sockets there and nothing else.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            ready_tx.send(rc).expect("ready");
            for req in rx {
                let r = exchange(&req);
                let _ = req.reply.send(r);
            }
        });
        assert_eq!(ready_rx.recv().expect("setns thread"), 0, "setns failed");
        Self { tx }
    }

    /// `method path` at `addr`; the status and the body.
    pub fn request(
        &self,
        method: &str,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<(u16, String), String> {
        let (reply, rx) = mpsc::channel();
        self.tx
            .send(Req {
                method: method.into(),
                addr,
                path: path.into(),
                headers: headers
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                    .collect(),
                body,
                reply,
            })
            .map_err(|e| e.to_string())?;
        rx.recv().map_err(|e| e.to_string())?
    }
}

fn exchange(req: &Req) -> Reply {
    let mut s = TcpStream::connect_timeout(&req.addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {}: {e}", req.addr))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let body = req.body.clone().unwrap_or_default();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        req.method,
        req.path,
        req.addr,
        body.len()
    );
    if req.body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in &req.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body.as_bytes()))
        .map_err(|e| e.to_string())?;
    // Read the head, then Content-Length bytes (chromedriver keeps the connection
    // open despite `Connection: close`), or to EOF without a length.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&raw, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|len| raw.len() >= end + 4 + len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    Ok((
        status,
        if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        },
    ))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A chromedriver and one browser session in namespace `ns`.
pub struct Browser {
    pub http: NsHttp,
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
    /// Where [`Browser::screenshot`] writes.
    pub shots: PathBuf,
}

impl Browser {
    /// Start chromedriver on 127.0.0.1:`port` in `ns` (its loopback brought up) and
    /// open a headless session, 1280×900.
    pub fn start(ns: &str, port: u16, shots: &Path) -> Self {
        // chromedriver listens on loopback only.
        let lo = Command::new("ip")
            .args(["netns", "exec", ns, "ip", "link", "set", "lo", "up"])
            .status()
            .expect("ip link set lo up");
        assert!(lo.success(), "lo up in {ns}");
        let driver = Command::new("ip")
            .args(["netns", "exec", ns, "chromedriver"])
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed (Debian package chromium-driver)");
        let http = NsHttp::new(ns);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let start = Instant::now();
        loop {
            if let Ok((200, body)) = http.request("GET", addr, "/status", &[], None) {
                if body.contains("\"ready\":true") {
                    break;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver not ready in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        std::fs::create_dir_all(shots).expect("screenshot dir");
        let mut b = Self {
            http,
            driver,
            addr,
            session: String::new(),
            _profile: profile,
            shots: shots.to_path_buf(),
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // The pages are served with the test's own CA.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-sync",
                    "--disable-component-update", "--hide-scrollbars",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", b._profile.path().display())]
            }
        }}});
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().expect("a session id").to_string();
        b
    }

    /// One WebDriver command; its `value`. Panics on a WebDriver error.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"))
    }

    pub fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).or_else(|| {
            // POST needs a body, even an empty object.
            (method == "POST").then(|| "{}".to_string())
        });
        let (status, text) = self.http.request(method, self.addr, path, &[], body)?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("HTTP {status}: {e}: {text}"))?;
        if status != 200 {
            return Err(format!(
                "HTTP {status}: {} {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url })));
    }

    pub fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &self.s("/window/rect"),
            Some(json!({"width": width, "height": height})),
        );
    }

    fn find_once(&self, css: &str) -> Result<String, String> {
        let v = self.try_call(
            "POST",
            &self.s("/element"),
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no element reference in {v}"))
    }

    /// Retry `f` on the element `css` until it works or 15 s pass (the page re-renders
    /// its cards every few seconds, so a found element can go stale).
    fn with_element<T>(&self, css: &str, f: impl Fn(&str) -> Result<T, String>) -> T {
        let start = Instant::now();
        loop {
            let r = self.find_once(css).and_then(|e| f(&e));
            match r {
                Ok(v) => return v,
                Err(e) if start.elapsed() > Duration::from_secs(15) => {
                    panic!("{css}: {e}\npage text:\n{}", self.body_text())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn click(&self, css: &str) {
        self.with_element(css, |e| {
            self.try_call("POST", &self.s(&format!("/element/{e}/click")), None)
                .map(|_| ())
        });
    }

    /// Clear the input `css` and type `text`.
    pub fn fill(&self, css: &str, text: &str) {
        self.with_element(css, |e| {
            self.try_call("POST", &self.s(&format!("/element/{e}/clear")), None)?;
            self.try_call(
                "POST",
                &self.s(&format!("/element/{e}/value")),
                Some(json!({ "text": text })),
            )
            .map(|_| ())
        });
    }

    pub fn text(&self, css: &str) -> String {
        self.with_element(css, |e| {
            self.try_call("GET", &self.s(&format!("/element/{e}/text")), None)
                .map(|v| v.as_str().unwrap_or_default().to_string())
        })
    }

    /// Run `script` (a function body; `arguments` are `args`) and return its value.
    pub fn js(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({"script": script, "args": args})),
        )
    }

    pub fn body_text(&self) -> String {
        self.try_call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({"script": "return document.body.innerText", "args": []})),
        )
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
    }

    /// Wait until the text of `css` satisfies `pred`; that text.
    pub fn wait_text(&self, css: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Ok(t) = self.find_once(css).and_then(|e| {
                self.try_call("GET", &self.s(&format!("/element/{e}/text")), None)
                    .map(|v| v.as_str().unwrap_or_default().to_string())
            }) {
                if pred(&t) {
                    return t;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what} in {css}; page text:\n{}",
                self.body_text()
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// Accept the page's `confirm()`.
    pub fn accept_alert(&self) {
        let start = Instant::now();
        while self
            .try_call("POST", &self.s("/alert/accept"), None)
            .is_err()
        {
            assert!(start.elapsed() < Duration::from_secs(10), "no alert");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cookie `name` as WebDriver describes it (`value`, `secure`, `httpOnly`,
    /// `sameSite`; HttpOnly ones included).
    pub fn cookie(&self, name: &str) -> Option<Value> {
        let v = self.call("GET", &self.s("/cookie"), None);
        v.as_array()?.iter().find(|c| c["name"] == name).cloned()
    }

    /// Run `script` asynchronously: it calls `arguments[arguments.length - 1](value)`.
    pub fn js_async(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.s("/execute/async"),
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Save a screenshot as `<shots>/<name>.png`; its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.call("GET", &self.s("/screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .expect("screenshot base64");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.try_call("DELETE", &self.s(""), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
