//! Resolving `--model`: local directory, Hugging Face cache, or hub download.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::LoadError;

/// Receives hub download progress, so a UI (the CLI's progress bar) can show it while the
/// loader itself stays UI-free. Calls come from the thread that called [`resolve`].
pub trait DownloadProgress: Send + Sync {
    /// `file` starts downloading; `bytes` is its size as the hub reports it (0: unknown).
    fn start(&self, file: &str, bytes: u64);
    /// `done` of `total` bytes of `file` have arrived.
    fn advance(&self, file: &str, done: u64, total: u64);
    /// `file` is in the cache (downloaded, or already there).
    fn finish(&self, file: &str);
}

/// How to resolve a model id.
#[derive(Clone, Default)]
pub struct ResolveOptions {
    /// Branch, tag or commit (default `main`).
    pub revision: Option<String>,
    /// Never touch the network (also set by `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Cache directory override (default: the standard Hugging Face cache).
    pub cache_dir: Option<PathBuf>,
    /// Hub endpoint override (default: `$HF_ENDPOINT`, else `https://huggingface.co`).
    pub endpoint: Option<String>,
    /// Where download progress goes (none: silent).
    pub progress: Option<Arc<dyn DownloadProgress>>,
}

impl std::fmt::Debug for ResolveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolveOptions")
            .field("revision", &self.revision)
            .field("offline", &self.offline)
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// A non-empty environment variable.
fn env(k: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(k).filter(|v| !v.is_empty())
}

/// `$HF_HOME`, else `~/.cache/huggingface`.
fn hf_home() -> PathBuf {
    env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
        env("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(".cache")
            .join("huggingface")
    })
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    env("HF_HUB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// A repository's folder in the cache at `cache` (`models--owner--name`).
fn repo_dir(cache: &Path, id: &str) -> PathBuf {
    cache.join(format!("models--{}", id.replace('/', "--")))
}

/// Whether `revision` is a full commit hash.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

/// Finds a snapshot of `id` in the cache at `cache`, if one is there.
fn find_in_cache(cache: &Path, id: &str, revision: &str) -> Result<PathBuf, String> {
    let repo = repo_dir(cache, id);
    if !repo.is_dir() {
        return Err(format!("{} (absent)", repo.display()));
    }
    let snapshots = repo.join("snapshots");
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        let r = repo.join("refs").join(revision);
        match std::fs::read_to_string(&r) {
            Ok(s) => s.trim().to_string(),
            Err(_) => return Err(format!("{} (no refs/{revision})", repo.display())),
        }
    };
    let snap = snapshots.join(&commit);
    if snap.join("config.json").is_file() {
        Ok(snap)
    } else {
        Err(format!("{} (snapshot has no config.json)", snap.display()))
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// Turns `--model` into a checkpoint directory: a local directory as is; else a snapshot
/// in the Hugging Face cache (`refs/<revision>` or a commit; used without asking the hub
/// whether the branch moved); else (unless offline: `opts.offline` or `HF_HUB_OFFLINE`) a
/// download into that cache, reporting to `opts.progress`. The error lists
/// everything that was tried.
pub fn resolve(model: &str, opts: &ResolveOptions) -> Result<PathBuf, LoadError> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let mut searched = vec![format!("local directory `{model}` (absent)")];
    if p.exists() {
        return Err(LoadError::NotFound {
            model: model.into(),
            searched: format!("`{model}` exists but is not a directory"),
        });
    }
    if !looks_like_repo_id(model) {
        return Err(LoadError::NotFound {
            model: model.into(),
            searched: searched.join("; "),
        });
    }
    let cache = opts.cache_dir.clone().unwrap_or_else(hub_cache_dir);
    let revision = opts.revision.as_deref().unwrap_or("main");
    match find_in_cache(&cache, model, revision) {
        Ok(dir) => return Ok(dir),
        Err(why) => searched.push(format!("Hugging Face cache {why}")),
    }
    if opts.offline || offline_from_env() {
        searched.push("hub download skipped (offline: HF_HUB_OFFLINE is set)".into());
        return Err(LoadError::NotFound {
            model: model.into(),
            searched: searched.join("; "),
        });
    }
    match download(model, revision, &cache, opts) {
        Ok(dir) => Ok(dir),
        Err(e) => {
            searched.push(format!("hub download failed: {e}"));
            Err(LoadError::NotFound {
                model: model.into(),
                searched: searched.join("; "),
            })
        }
    }
}

/// The hub's base address: `opts.endpoint`, else `$HF_ENDPOINT`, else `https://huggingface.co`.
fn endpoint(opts: &ResolveOptions) -> String {
    let env = std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let e = opts
        .endpoint
        .clone()
        .or(env)
        .unwrap_or_else(|| "https://huggingface.co".into());
    e.trim().trim_end_matches('/').to_string()
}

/// The user's hub token: `$HF_TOKEN`, else the file `huggingface-cli login` writes
/// (`$HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token`).
fn token() -> Option<String> {
    if let Some(t) = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Some(t.trim().to_string());
    }
    let path = env("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("token"));
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// `scheme://host[:port]` of `url`: what a host-relative `Location` is resolved against.
fn origin(url: &str) -> &str {
    let host_start = url.find("://").map_or(0, |i| i + 3);
    match url[host_start..].find('/') {
        Some(i) => &url[..host_start + i],
        None => url,
    }
}

/// Percent-encodes `s` for one URL path segment (a revision such as `refs/pr/1` included).
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What the hub reports about one file of a revision.
#[derive(Debug, Clone)]
struct FileMeta {
    /// The commit the revision resolves to (`X-Repo-Commit`).
    commit: String,
    /// The blob name in the cache: the LFS object's `X-Linked-Etag`, else the `ETag`.
    etag: String,
    /// The file's size (`X-Linked-Size`, else `Content-Length`; 0: unknown).
    size: u64,
}

/// Why one file could not be fetched.
#[derive(Debug)]
enum FetchError {
    /// The hub has no such file in the revision (404 `EntryNotFound`).
    Missing,
    /// Anything else, as a message.
    Failed(String),
}

impl From<String> for FetchError {
    fn from(m: String) -> Self {
        FetchError::Failed(m)
    }
}

/// A header's value as text, if present and ASCII.
fn header<'a>(r: &'a ureq::http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A synchronous client for the hub's `resolve` endpoint, the protocol huggingface_hub
/// speaks: `HEAD {endpoint}/{id}/resolve/{revision}/{file}` without following an
/// absolute redirect gives the commit, blob name and size; `GET` follows the redirect to
/// the LFS/xet CDN (without the token) for the bytes.
struct Hub<'a> {
    /// Redirects are handled by hand (HEAD must not leave the hub).
    head: ureq::Agent,
    /// Follows redirects, never forwarding `Authorization`.
    get: ureq::Agent,
    endpoint: String,
    id: &'a str,
    revision: &'a str,
    token: Option<String>,
    progress: Option<Arc<dyn DownloadProgress>>,
}

impl<'a> Hub<'a> {
    fn new(id: &'a str, revision: &'a str, opts: &ResolveOptions) -> Self {
        let agent = |redirects: u32| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .timeout_connect(Some(std::time::Duration::from_secs(30)))
                .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        Self {
            head: agent(0),
            get: agent(10),
            endpoint: endpoint(opts),
            id,
            revision,
            token: token(),
            progress: opts.progress.clone(),
        }
    }

    fn url(&self, file: &str) -> String {
        let file: Vec<String> = file.split('/').map(encode_segment).collect();
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            self.id,
            encode_segment(self.revision),
            file.join("/")
        )
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// The hub's metadata for `file`; follows relative redirects (renamed repos) only.
    fn meta(&self, file: &str) -> Result<FileMeta, FetchError> {
        let mut url = self.url(file);
        for _ in 0..5 {
            let r = self
                .auth(self.head.head(&url))
                .call()
                .map_err(|e| format!("{file}: {e}"))?;
            let status = r.status().as_u16();
            if (300..400).contains(&status) {
                let loc = header(&r, "location").unwrap_or_default();
                if loc.starts_with('/') {
                    url = format!("{}{loc}", origin(&self.endpoint));
                    continue;
                }
            } else if matches!(status, 401 | 403 | 404) {
                // huggingface.co answers 401 `RepoNotFound` for a repo that is absent or
                // private to an anonymous user, and 404 `EntryNotFound` for a missing file.
                let code = header(&r, "x-error-code").unwrap_or_default();
                let token = if self.token.is_some() {
                    ""
                } else {
                    " (a private or gated one needs HF_TOKEN)"
                };
                return Err(match code {
                    "RepoNotFound" => FetchError::Failed(format!(
                        "repository {} not found on {}{token}",
                        self.id, self.endpoint
                    )),
                    "RevisionNotFound" => FetchError::Failed(format!(
                        "revision `{}` of {} not found",
                        self.revision, self.id
                    )),
                    _ if status == 404 => FetchError::Missing,
                    _ => FetchError::Failed(format!(
                        "{}: access denied (HTTP {status}){token}",
                        self.id
                    )),
                });
            } else if !(200..300).contains(&status) {
                return Err(FetchError::Failed(format!(
                    "{file}: HTTP {status} from {url}"
                )));
            }
            let commit = header(&r, "x-repo-commit")
                .map(str::to_string)
                .or_else(|| is_commit(self.revision).then(|| self.revision.to_string()))
                .ok_or_else(|| format!("{file}: the hub sent no X-Repo-Commit"))?;
            let etag = header(&r, "x-linked-etag")
                .or_else(|| header(&r, "etag"))
                .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
                .ok_or_else(|| format!("{file}: the hub sent no ETag"))?;
            let safe = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric());
            if !safe(&commit) || !safe(&etag) {
                return Err(FetchError::Failed(format!(
                    "{file}: unexpected commit `{commit}` or ETag `{etag}` from the hub"
                )));
            }
            let size = header(&r, "x-linked-size")
                .or_else(|| header(&r, "content-length"))
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            return Ok(FileMeta { commit, etag, size });
        }
        Err(FetchError::Failed(format!("{file}: too many redirects")))
    }

    /// Makes sure `file`'s blob is in `blobs` (downloading it through a temporary file
    /// that is removed on failure) and returns the hub's metadata for it.
    fn fetch(&self, file: &str, blobs: &Path) -> Result<FileMeta, FetchError> {
        let meta = self.meta(file)?;
        let blob = blobs.join(&meta.etag);
        if !blob.is_file() {
            let tmp = blobs.join(format!("{}.{}.incomplete", meta.etag, std::process::id()));
            let got = self.download_to(file, &meta, &tmp);
            let got = got.and_then(|()| {
                std::fs::rename(&tmp, &blob).map_err(|e| format!("{}: {e}", blob.display()))
            });
            if let Err(e) = got {
                let _ = std::fs::remove_file(&tmp);
                return Err(FetchError::Failed(e));
            }
        }
        if let Some(p) = &self.progress {
            p.finish(file);
        }
        Ok(meta)
    }

    fn download_to(&self, file: &str, meta: &FileMeta, tmp: &Path) -> Result<(), String> {
        use std::io::{Read, Write};
        let r = self
            .auth(self.get.get(&self.url(file)))
            .call()
            .map_err(|e| format!("{file}: {e}"))?;
        let status = r.status().as_u16();
        if status != 200 {
            return Err(format!("{file}: HTTP {status} while downloading"));
        }
        let total = if meta.size > 0 {
            meta.size
        } else {
            header(&r, "content-length")
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        if let Some(p) = &self.progress {
            p.start(file, total);
        }
        let mut body = r.into_body().into_reader();
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?,
        );
        let mut buf = vec![0u8; 1 << 16];
        let mut done = 0u64;
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|e| format!("{file}: download interrupted after {done} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            done += n as u64;
            if let Some(p) = &self.progress {
                p.advance(file, done, total);
            }
        }
        out.flush().map_err(|e| format!("{}: {e}", tmp.display()))?;
        if meta.size > 0 && done != meta.size {
            return Err(format!(
                "{file}: download ended after {done} of {} bytes",
                meta.size
            ));
        }
        Ok(())
    }
}

/// Points `snapshot/<file>` at `blobs/<etag>` (a relative symlink, as huggingface_hub
/// makes; a copy where symlinks are unavailable).
fn link_into_snapshot(snapshot: &Path, file: &str, etag: &str) -> Result<(), String> {
    let link = snapshot.join(file);
    let depth = file.matches('/').count() + 2;
    let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    if std::fs::symlink_metadata(&link).is_ok() {
        std::fs::remove_file(&link).map_err(|e| format!("{}: {e}", link.display()))?;
    }
    #[cfg(unix)]
    let made = std::os::unix::fs::symlink(&target, &link);
    #[cfg(not(unix))]
    let made = std::fs::copy(snapshot.join(&target), &link).map(|_| ());
    made.map_err(|e| format!("{}: {e}", link.display()))
}

/// Downloads config, weights (safetensors preferred, then shards, `pytorch_model.bin`,
/// `tf_model.h5`) and tokenizer files into the cache's standard layout
/// (`models--org--name/{blobs,snapshots/<commit>,refs/<revision>}`, which transformers
/// reads too). The snapshot links and the ref are written only once every required file
/// is in `blobs`, so a failed download never leaves a snapshot that looks complete.
fn download(
    id: &str,
    revision: &str,
    cache: &Path,
    opts: &ResolveOptions,
) -> Result<PathBuf, String> {
    let hub = Hub::new(id, revision, opts);
    let repo = repo_dir(cache, id);
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
    let required = |file: &str| -> Result<FileMeta, String> {
        hub.fetch(file, &blobs).map_err(|e| match e {
            FetchError::Missing => {
                format!("{file} not found in {id} at revision `{revision}`")
            }
            FetchError::Failed(m) => m,
        })
    };
    let config = required("config.json")?;
    let mut got: Vec<(String, FileMeta)> = vec![("config.json".into(), config.clone())];
    for file in [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "tf_model.h5",
    ] {
        let meta = match hub.fetch(file, &blobs) {
            Ok(m) => m,
            Err(FetchError::Missing) => continue,
            Err(FetchError::Failed(m)) => return Err(m),
        };
        if file.ends_with(".index.json") {
            let index = blobs.join(&meta.etag);
            let text = std::fs::read_to_string(&index).map_err(|e| format!("{file}: {e}"))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                if s.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
                    return Err(format!("{file}: unsafe shard name `{s}`"));
                }
                let m = required(&s)?;
                got.push((s, m));
            }
        }
        got.push((file.to_string(), meta));
        break;
    }
    if got.len() == 1 {
        return Err(format!(
            "{id} has no safetensors, pytorch_model.bin or tf_model.h5 weights"
        ));
    }
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ] {
        match hub.fetch(optional, &blobs) {
            Ok(m) => got.push((optional.to_string(), m)),
            Err(FetchError::Missing) => {}
            Err(FetchError::Failed(m)) => return Err(m),
        }
    }
    let snapshot = repo.join("snapshots").join(&config.commit);
    for (file, meta) in &got {
        link_into_snapshot(&snapshot, file, &meta.etag)?;
    }
    if revision != config.commit {
        let r = repo.join("refs").join(revision);
        if let Some(parent) = r.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&r, &config.commit).map_err(|e| format!("{}: {e}", r.display()))?;
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Record(std::sync::Mutex<Vec<String>>);

    impl DownloadProgress for Record {
        fn start(&self, file: &str, bytes: u64) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("start {file} {bytes}"));
        }
        fn advance(&self, file: &str, done: u64, total: u64) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("advance {file} {done}/{total}"));
        }
        fn finish(&self, file: &str) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("finish {file}"));
        }
    }

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const CONFIG: &[u8] = br#"{"model_type": "bert"}"#;
    const WEIGHTS_ETAG: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

    fn weights() -> Vec<u8> {
        (0..100_000u32).map(|i| (i % 251) as u8).collect()
    }

    /// A one-repo hub on 127.0.0.1 (`org/tiny` at `main`; `org/renamed` 307s to it): `config.json` served directly,
    /// `model.safetensors` as a 302 to `/cdn/` with `X-Linked-Etag`/`X-Linked-Size` like
    /// huggingface.co; with `truncate`, the CDN closes the connection after 1000 bytes.
    /// Returns the endpoint; the server thread lives until the test process ends.
    fn tiny_hub(truncate: bool) -> std::io::Result<String> {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        std::thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                let Ok(read) = c.try_clone() else { continue };
                let mut reader = BufReader::new(read);
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).map_or(true, |n| n == 0) || h.trim().is_empty() {
                        break;
                    }
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let head = |status: &str, extra: String, len: usize| {
                    format!(
                        "HTTP/1.1 {status}\r\n{extra}Content-Length: {len}\r\nConnection: close\r\n\r\n"
                    )
                };
                let w = weights();
                let (out, body): (String, &[u8]) = match path {
                    "/org/tiny/resolve/main/config.json" => (
                        head(
                            "200 OK",
                            format!("ETag: \"c0ff1e\"\r\nX-Repo-Commit: {COMMIT}\r\n"),
                            CONFIG.len(),
                        ),
                        CONFIG,
                    ),
                    "/org/tiny/resolve/main/model.safetensors" => (
                        head(
                            "302 Found",
                            format!(
                                "Location: http://127.0.0.1:{port}/cdn/w\r\nETag: \"1f\"\r\nX-Linked-Etag: \"{WEIGHTS_ETAG}\"\r\nX-Linked-Size: {}\r\nX-Repo-Commit: {COMMIT}\r\n",
                                w.len()
                            ),
                            0,
                        ),
                        &[],
                    ),
                    "/cdn/w" if truncate => (head("200 OK", String::new(), w.len()), &w[..1000]),
                    "/cdn/w" => (head("200 OK", String::new(), w.len()), &w[..]),
                    p if p.starts_with("/org/renamed/") => (
                        head(
                            "307 Temporary Redirect",
                            format!("Location: {}\r\n", p.replacen("renamed", "tiny", 1)),
                            0,
                        ),
                        &[],
                    ),
                    _ => (
                        head(
                            "404 Not Found",
                            format!("X-Error-Code: EntryNotFound\r\nX-Repo-Commit: {COMMIT}\r\n"),
                            0,
                        ),
                        &[],
                    ),
                };
                if method == "GET" {
                    let _ = c.write_all(out.as_bytes()).and_then(|()| c.write_all(body));
                } else {
                    let _ = c.write_all(out.as_bytes());
                }
            }
        });
        Ok(format!("http://127.0.0.1:{port}"))
    }

    fn online(endpoint: String, cache: &Path, rec: &Arc<Record>) -> ResolveOptions {
        ResolveOptions {
            cache_dir: Some(cache.to_path_buf()),
            endpoint: Some(endpoint),
            progress: Some(rec.clone()),
            ..Default::default()
        }
    }

    #[test]
    fn downloads_into_the_standard_cache_layout_with_progress() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let rec = Arc::new(Record::default());
        let snap = resolve("org/tiny", &online(tiny_hub(false)?, tmp.path(), &rec))
            .map_err(std::io::Error::other)?;
        let repo = tmp.path().join("models--org--tiny");
        assert_eq!(snap, repo.join("snapshots").join(COMMIT));
        assert_eq!(
            std::fs::read_to_string(repo.join("refs").join("main"))?,
            COMMIT
        );
        assert_eq!(
            std::fs::read_link(snap.join("model.safetensors"))?,
            Path::new("../../blobs").join(WEIGHTS_ETAG)
        );
        assert_eq!(std::fs::read(snap.join("model.safetensors"))?, weights());
        assert_eq!(std::fs::read(snap.join("config.json"))?, CONFIG);
        assert!(!snap.join("tokenizer.json").exists());
        let events = rec.0.lock().map(|v| v.clone()).unwrap_or_default();
        let total = weights().len();
        for want in [
            format!("start model.safetensors {total}"),
            format!("advance model.safetensors {total}/{total}"),
            "finish model.safetensors".to_string(),
            "finish config.json".to_string(),
        ] {
            assert!(events.contains(&want), "{want} not in {events:#?}");
        }
        // Offline, the snapshot is found in the cache.
        let offline = ResolveOptions {
            offline: true,
            cache_dir: Some(tmp.path().to_path_buf()),
            ..Default::default()
        };
        assert_eq!(resolve("org/tiny", &offline).ok(), Some(snap));
        Ok(())
    }

    #[test]
    fn a_renamed_repo_is_followed_on_the_hub() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let rec = Arc::new(Record::default());
        let snap = resolve("org/renamed", &online(tiny_hub(false)?, tmp.path(), &rec))
            .map_err(std::io::Error::other)?;
        assert_eq!(
            snap,
            tmp.path()
                .join("models--org--renamed")
                .join("snapshots")
                .join(COMMIT)
        );
        assert_eq!(std::fs::read(snap.join("model.safetensors"))?, weights());
        Ok(())
    }

    #[test]
    fn truncated_download_is_one_line_and_leaves_no_snapshot() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let rec = Arc::new(Record::default());
        let err = resolve("org/tiny", &online(tiny_hub(true)?, tmp.path(), &rec))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("hub download failed: model.safetensors: download interrupted"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        let repo = tmp.path().join("models--org--tiny");
        assert!(!repo.join("snapshots").exists());
        assert!(!repo.join("refs").exists());
        let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(blobs, ["c0ff1e"], "only the complete config blob stays");
        // Offline afterwards, nothing half-downloaded is mistaken for a checkpoint.
        let offline = ResolveOptions {
            offline: true,
            cache_dir: Some(tmp.path().to_path_buf()),
            ..Default::default()
        };
        assert!(resolve("org/tiny", &offline).is_err());
        Ok(())
    }

    #[test]
    fn relative_redirects_resolve_against_the_host() {
        assert_eq!(origin("https://hf.example/mirror"), "https://hf.example");
        assert_eq!(origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
    }

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("bert-base-cased"));
        assert!(looks_like_repo_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
        assert!(!looks_like_repo_id(""));
    }

    #[test]
    fn finds_cached_snapshot() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let repo = tmp.path().join("models--org--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap)?;
        std::fs::create_dir_all(repo.join("refs"))?;
        std::fs::write(repo.join("refs").join("main"), "abc123\n")?;
        std::fs::write(snap.join("config.json"), "{}")?;
        let opts = ResolveOptions {
            offline: true,
            cache_dir: Some(tmp.path().to_path_buf()),
            ..Default::default()
        };
        assert_eq!(resolve("org/tiny", &opts).ok(), Some(snap));
        let err = resolve("org/other", &opts).err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("models--org--other (absent)"), "{err}");
        assert!(err.contains("offline"), "{err}");
        Ok(())
    }
}
