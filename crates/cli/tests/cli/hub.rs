//! Hub downloads end to end against a fake hub: a small HTTP/1.1 server on 127.0.0.1 that
//! serves testdata/bert-tiny-text-classification the way huggingface.co answers huggingface_hub's `resolve`
//! requests
//! (`HEAD`/`GET /{repo}/resolve/{revision}/{file}` with `ETag`, `X-Repo-Commit` and
//! `Content-Length`; 404 for unknown repos and files). The network is never used.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

/// The repo the fake hub serves, and the commit each revision it knows points at.
const REPO: &str = "ferry-test/tiny-classifier";
/// Further repos: (id, testdata case) — sharded safetensors, pytorch_model.bin only, and
/// tf_model.h5 only.
const MORE_REPOS: &[(&str, &str)] = &[
    ("ferry-test/tiny-sharded", "bert-tiny-relu-sharded"),
    ("ferry-test/tiny-bin", "bert-tiny-tanh-bin"),
    ("ferry-test/tiny-tf", "tf-bert-tiny-feature-extraction"),
];
/// A repo whose weights' CDN drops the connection halfway through the file.
const BROKEN_REPO: &str = "ferry-test/tiny-broken";
const COMMIT_MAIN: &str = "1111111111111111111111111111111111111111";
const COMMIT_V1: &str = "2222222222222222222222222222222222222222";

/// One request as the fake hub received it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

/// The fake hub: serves until dropped and records every request.
struct FakeHub {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    serve(c, &r, port);
                }
            }
        });
        Self {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests").clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A stable fake ETag for a file's bytes (the real hub sends a git or sha256 hash).
fn etag(bytes: &[u8]) -> String {
    // FNV-1a, 64 bits, twice with different offsets: 32 hex digits.
    let fnv = |seed: u64| {
        bytes.iter().fold(seed, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    format!(
        "{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x8422_2325_cbf2_9ce4)
    )
}

/// Whether the real hub stores `file` with LFS, answering `resolve` with a redirect to its
/// CDN (weights), rather than with the bytes (small text files).
fn is_lfs(file: &str) -> bool {
    [".safetensors", ".bin", ".h5"]
        .iter()
        .any(|e| file.ends_with(e))
}

/// Answers one connection (one request; `Connection: close`). Like huggingface.co, weight
/// files answer with a 302 to an absolute CDN address (`/cdn/…` on this server) carrying
/// `X-Linked-Etag` / `X-Linked-Size` (the `ETag` is the LFS pointer's), so the client must
/// take the blob name from the linked headers and follow the redirect for the bytes.
fn serve(mut c: TcpStream, log: &Mutex<Vec<Request>>, port: u16) {
    let mut reader = BufReader::new(match c.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    log.lock().expect("log").push(Request {
        method: method.clone(),
        path: path.clone(),
        headers,
    });

    let repos = [
        (REPO, "bert-tiny-text-classification"),
        (BROKEN_REPO, "bert-tiny-text-classification"),
    ]
    .into_iter()
    .chain(MORE_REPOS.iter().copied());
    let found = repos
        .filter_map(|(id, case)| {
            path.strip_prefix(&format!("/{id}/resolve/"))
                .map(|rest| (case, rest))
        })
        .next()
        .and_then(|(case, rest)| {
            let (rev, file) = rest.split_once('/')?;
            let commit = match rev {
                "main" | COMMIT_MAIN => COMMIT_MAIN,
                "v1" | COMMIT_V1 => COMMIT_V1,
                _ => return None,
            };
            Some((case, commit, file.to_string()))
        });
    if let Some(rest) = path.strip_prefix("/cdn-broken/") {
        let bytes =
            std::fs::read(testdata("bert-tiny-text-classification").join(rest)).unwrap_or_default();
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            bytes.len()
        )
        .into_bytes();
        r.extend_from_slice(&bytes[..bytes.len() / 2]);
        let _ = c.write_all(&r);
        let _ = c.flush();
        return;
    }
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let response = match rest.split_once('/') {
            Some((case, file)) if !rest.contains("..") => {
                match std::fs::read(testdata(case).join(file)) {
                    Ok(bytes) => {
                        let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                        bytes.len()
                    )
                    .into_bytes();
                        if method == "GET" {
                            r.extend_from_slice(&bytes);
                        }
                        r
                    }
                    Err(_) => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                }
            }
            _ => {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            }
        };
        let _ = c.write_all(&response);
        let _ = c.flush();
        return;
    }
    let response = match found {
        Some((case, commit, file)) if is_lfs(&file) && testdata(case).join(&file).is_file() && !file.contains("..") => {
            let bytes = std::fs::read(testdata(case).join(&file)).unwrap_or_default();
            let cdn = if path.starts_with(&format!("/{BROKEN_REPO}/")) {
                "cdn-broken".to_string()
            } else {
                format!("cdn/{case}")
            };
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/{cdn}/{file}\r\nETag: \"pointer-{}\"\r\nX-Linked-Etag: \"{}\"\r\nX-Linked-Size: {}\r\nX-Repo-Commit: {commit}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                etag(file.as_bytes()),
                etag(&bytes),
                bytes.len()
            )
            .into_bytes()
        }
        Some((case, commit, file)) => {
            let p = testdata(case).join(&file);
            match std::fs::read(&p) {
                Ok(bytes) if !file.contains("..") => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"{}\"\r\nX-Repo-Commit: {commit}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                        bytes.len(),
                        etag(&bytes)
                    );
                    let mut r = head.into_bytes();
                    if method == "GET" {
                        r.extend_from_slice(&bytes);
                    }
                    r
                }
                _ => format!(
                    "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nX-Repo-Commit: {commit}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .into_bytes(),
            }
        }
        None => "HTTP/1.1 404 Not Found\r\nX-Error-Code: RepoNotFound\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .as_bytes()
            .to_vec(),
    };
    let _ = c.write_all(&response);
    let _ = c.flush();
}

/// `ferry` with the hub pointed at `hub`, the cache in `home`, and no ambient token,
/// offline flag or proxy.
fn hub_ferry(hub: &FakeHub, home: &Path) -> Command {
    let mut cmd = ferry();
    cmd.env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HOME", home)
        .env("HF_HUB_CACHE", home.join("hub"))
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("all_proxy");
    cmd
}

fn hub_export(cmd: &mut Command, model: &str, out: &Path, extra: &[&str]) -> Output {
    run(cmd.args(["export", "--model", model]).args(extra).arg(out))
}

fn golden_parity(out: &Path, golden: &Path) {
    let golden = ferry_verifier::Golden::load(golden).expect("golden");
    let mut m = ferry_verifier::Model::load(out, 1).expect("ONNX Runtime loads the export");
    for r in ferry_verifier::compare(&mut m, &golden).expect("runs") {
        println!("hub download {}: max-abs {:.3e}", r.name, r.max_abs);
        assert!(r.max_abs <= 1e-5, "{}: max-abs {}", r.name, r.max_abs);
    }
}

#[test]
fn hub_download_exports_fills_the_cache_and_works_offline() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().expect("tempdir");
    let out = home.path().join("model.onnx");
    let o = hub_export(&mut hub_ferry(&hub, home.path()), REPO, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("task text-classification"),
        "{}",
        stderr(&o)
    );
    golden_parity(
        &out,
        &testdata("bert-tiny-text-classification").join("golden.safetensors"),
    );

    // The requests: HEAD + GET per file, on revision main, without a token.
    let reqs = hub.requests();
    let paths: Vec<String> = reqs
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    for want in [
        format!("HEAD /{REPO}/resolve/main/config.json"),
        format!("GET /{REPO}/resolve/main/config.json"),
        format!("HEAD /{REPO}/resolve/main/model.safetensors"),
        format!("GET /{REPO}/resolve/main/model.safetensors"),
        "GET /cdn/bert-tiny-text-classification/model.safetensors".to_string(),
        format!("GET /{REPO}/resolve/main/tokenizer.json"),
    ] {
        assert!(paths.contains(&want), "{want} not in {paths:#?}");
    }
    assert!(
        !paths.iter().any(|p| p.contains("pytorch_model.bin")),
        "safetensors preferred: {paths:#?}"
    );
    assert!(
        reqs.iter()
            .all(|r| !r.headers.contains_key("authorization"))
    );

    // The standard cache layout, which transformers reads too.
    let repo = home
        .path()
        .join("hub")
        .join("models--ferry-test--tiny-classifier");
    let refs = std::fs::read_to_string(repo.join("refs").join("main")).expect("refs/main");
    assert_eq!(refs.trim(), COMMIT_MAIN);
    let snap = repo.join("snapshots").join(COMMIT_MAIN);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ] {
        let link = snap.join(file);
        let target = std::fs::read_link(&link).expect("snapshot entries are symlinks");
        assert!(
            target.starts_with("../../blobs"),
            "{file} -> {}",
            target.display()
        );
        let served = std::fs::read(testdata("bert-tiny-text-classification").join(file))
            .expect("served file");
        assert_eq!(std::fs::read(&link).expect("cached file"), served, "{file}");
        let blob = repo.join("blobs").join(etag(&served));
        assert!(blob.is_file(), "blob {} for {file}", blob.display());
    }

    // Offline, from the cache: no request at all.
    let before = hub.requests().len();
    let out2 = home.path().join("offline.onnx");
    let o = hub_export(
        hub_ferry(&hub, home.path()).env("HF_HUB_OFFLINE", "1"),
        REPO,
        &out2,
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        hub.requests().len(),
        before,
        "offline run made requests: {:#?}",
        &hub.requests()[before..]
    );
    golden_parity(
        &out2,
        &testdata("bert-tiny-text-classification").join("golden.safetensors"),
    );
}

#[test]
fn hub_offline_with_an_empty_cache_fails_cleanly() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().expect("tempdir");
    let out = home.path().join("model.onnx");
    let o = hub_export(
        hub_ferry(&hub, home.path()).env("HF_HUB_OFFLINE", "1"),
        REPO,
        &out,
        &[],
    );
    assert_fails_cleanly(&o, &out, "offline");
    println!("offline: {}", stderr(&o));
    assert!(hub.requests().is_empty(), "{:#?}", hub.requests());
}

#[test]
fn hub_missing_model_is_a_one_line_error() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().expect("tempdir");
    let out = home.path().join("model.onnx");
    let o = hub_export(
        &mut hub_ferry(&hub, home.path()),
        "ferry-test/no-such-model",
        &out,
        &[],
    );
    assert_fails_cleanly(&o, &out, "not found");
    let err = stderr(&o);
    println!("404: {err}");
    assert!(err.contains("ferry-test/no-such-model"), "{err}");
    let reqs = hub.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path == "/ferry-test/no-such-model/resolve/main/config.json"),
        "{reqs:#?}"
    );
    // A missing revision of a known repo fails the same way.
    let o = hub_export(
        &mut hub_ferry(&hub, home.path()),
        REPO,
        &out,
        &["--revision", "no-such-branch"],
    );
    assert_fails_cleanly(&o, &out, "not found");
}

#[test]
fn hub_revision_and_token_reach_the_server() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().expect("tempdir");
    let out = home.path().join("model.onnx");
    let o = hub_export(
        hub_ferry(&hub, home.path()).env("HF_TOKEN", "hf_ferry_fake_token"),
        REPO,
        &out,
        &["--revision", "v1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let reqs = hub.requests();
    assert!(!reqs.is_empty());
    // Every hub request names the revision and carries the token (the CDN requests the
    // weights are redirected to are not the hub's).
    for r in reqs.iter().filter(|r| !r.path.starts_with("/cdn/")) {
        assert!(
            r.path.starts_with(&format!("/{REPO}/resolve/v1/")),
            "{} {}",
            r.method,
            r.path
        );
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some("Bearer hf_ferry_fake_token"),
            "{} {}",
            r.method,
            r.path
        );
    }
    let repo = home
        .path()
        .join("hub")
        .join("models--ferry-test--tiny-classifier");
    let refs = std::fs::read_to_string(repo.join("refs").join("v1")).expect("refs/v1");
    assert_eq!(refs.trim(), COMMIT_V1);
    assert!(
        repo.join("snapshots")
            .join(COMMIT_V1)
            .join("config.json")
            .is_file()
    );
    assert!(!repo.join("refs").join("main").exists());
}

#[test]
fn hub_downloads_sharded_pytorch_bin_and_tf_checkpoints() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().expect("tempdir");
    for (id, case) in MORE_REPOS {
        let out = home.path().join(format!("{case}.onnx"));
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(testdata(case).join("case.json")).expect("case.json"),
        )
        .expect("json");
        let task = meta["task"].as_str().expect("task");
        let o = hub_export(
            &mut hub_ferry(&hub, home.path()),
            id,
            &out,
            &["--task", task],
        );
        assert!(o.status.success(), "{id}: {}", stderr(&o));
        golden_parity(&out, &testdata(case).join("golden.safetensors"));
        let snap = home
            .path()
            .join("hub")
            .join(format!("models--{}", id.replace('/', "--")))
            .join("snapshots")
            .join(COMMIT_MAIN);
        let local: Vec<String> = std::fs::read_dir(testdata(case))
            .expect("case dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.ends_with(".safetensors") && n.starts_with("model")
                    || n.ends_with(".bin")
                    || n.ends_with(".index.json")
                    || n.ends_with(".h5")
            })
            .collect();
        assert!(!local.is_empty());
        for f in &local {
            assert!(snap.join(f).is_file(), "{id}: {f} not downloaded");
        }
    }
    // The .bin repo: safetensors asked for first (404), then the .bin.
    let paths: Vec<String> = hub.requests().iter().map(|r| r.path.clone()).collect();
    assert!(paths.contains(&"/ferry-test/tiny-bin/resolve/main/model.safetensors".to_string()));
    assert!(paths.contains(&"/ferry-test/tiny-bin/resolve/main/pytorch_model.bin".to_string()));
}

#[test]
fn hub_interrupted_download_is_a_one_line_error_and_leaves_no_snapshot() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().expect("tempdir");
    let out = home.path().join("model.onnx");
    let o = hub_export(&mut hub_ferry(&hub, home.path()), BROKEN_REPO, &out, &[]);
    assert_fails_cleanly(&o, &out, "model.safetensors: download interrupted");
    println!("interrupted: {}", stderr(&o));
    let repo = home
        .path()
        .join("hub")
        .join("models--ferry-test--tiny-broken");
    assert!(!repo.join("snapshots").exists(), "no snapshot on failure");
    assert!(!repo.join("refs").exists(), "no ref on failure");
    let left: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .expect("blobs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".incomplete"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
