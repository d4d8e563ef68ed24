//! Resolving `--model`: local directory, Hugging Face cache, or hub download.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::LoadError;

/// Receives hub download progress, so a UI (the CLI's progress bar) can show it while the
/// loader itself stays UI-free. Calls come from hf-hub's runtime thread.
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
    /// Hub endpoint override (default: hf-hub's, i.e. `$HF_ENDPOINT` else
    /// `https://huggingface.co`).
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

/// Forwards one file's hf-hub download events to a [`DownloadProgress`].
struct ProgressAdapter {
    sink: Arc<dyn DownloadProgress>,
    file: String,
}

impl hf_hub::progress::ProgressHandler for ProgressAdapter {
    fn on_progress(&self, event: &hf_hub::progress::ProgressEvent) {
        use hf_hub::progress::{DownloadEvent, ProgressEvent};
        let ProgressEvent::Download(e) = event else {
            return;
        };
        match e {
            DownloadEvent::Start { total_bytes, .. } => self.sink.start(&self.file, *total_bytes),
            DownloadEvent::Progress { files } => {
                for f in files {
                    self.sink
                        .advance(&self.file, f.bytes_completed, f.total_bytes);
                }
            }
            DownloadEvent::AggregateProgress {
                bytes_completed,
                total_bytes,
                ..
            } => self
                .sink
                .advance(&self.file, *bytes_completed, *total_bytes),
            DownloadEvent::Complete => self.sink.finish(&self.file),
        }
    }
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = env("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = env("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = env("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache").join("huggingface").join("hub")
}

fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

/// Finds a snapshot of `id` in the cache at `cache`, if one is there.
fn find_in_cache(cache: &Path, id: &str, revision: &str) -> Result<PathBuf, String> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(format!("{} (absent)", repo.display()));
    }
    let snapshots = repo.join("snapshots");
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
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
/// download through hf-hub into that cache, reporting to `opts.progress`. The error lists
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

/// Downloads config, weights (safetensors preferred) and tokenizer files into the cache
/// (`models--org--name/{blobs,refs,snapshots}`, the layout transformers reads). hf-hub
/// takes the endpoint from `HF_ENDPOINT` and the token from `HF_TOKEN` (or the token
/// file `huggingface-cli login` writes) unless `opts` overrides the endpoint.
fn download(
    id: &str,
    revision: &str,
    cache: &Path,
    opts: &ResolveOptions,
) -> Result<PathBuf, String> {
    let mut builder = hf_hub::HFClient::builder().cache_dir(cache.to_path_buf());
    if let Some(e) = &opts.endpoint {
        builder = builder.endpoint(e.clone());
    }
    let client = builder.build_sync().map_err(|e| e.to_string())?;
    let (owner, name) = hf_hub::split_id(id);
    let repo = client.model(owner, name);
    let fetch = |file: &str| {
        let req = repo.download_file().filename(file).revision(revision);
        match &opts.progress {
            Some(sink) => req
                .progress(ProgressAdapter {
                    sink: sink.clone(),
                    file: file.to_string(),
                })
                .send(),
            None => req.send(),
        }
    };
    let config = fetch("config.json").map_err(|e| e.to_string())?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "download returned no directory".to_string())?;
    let mut got_weights = false;
    for candidates in [
        &["model.safetensors"][..],
        &["model.safetensors.index.json"],
        &["pytorch_model.bin"],
        &["pytorch_model.bin.index.json"],
        &["tf_model.h5"],
    ] {
        let file = candidates[0];
        let got = match fetch(file) {
            Ok(_) => true,
            Err(hf_hub::HFError::EntryNotFound { .. }) => false,
            Err(e) => return Err(format!("{file}: {e}")),
        };
        if got {
            if file.ends_with(".index.json") {
                let text = std::fs::read_to_string(dir.join(file)).map_err(|e| e.to_string())?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| e.to_string())?;
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
                    fetch(&s).map_err(|e| format!("{s}: {e}"))?;
                }
            }
            got_weights = true;
            break;
        }
    }
    if !got_weights {
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
        let _ = fetch(optional);
    }
    Ok(dir)
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

    #[test]
    fn hf_hub_download_events_reach_the_progress_sink() {
        use hf_hub::progress::{
            DownloadEvent, FileProgress, FileStatus, ProgressEvent, ProgressHandler,
        };
        let rec = Arc::new(Record::default());
        let adapter = ProgressAdapter {
            sink: rec.clone(),
            file: "model.safetensors".into(),
        };
        for e in [
            DownloadEvent::Start {
                total_files: 1,
                total_bytes: 100,
            },
            DownloadEvent::Progress {
                files: vec![FileProgress {
                    filename: "model.safetensors".into(),
                    bytes_completed: 40,
                    total_bytes: 100,
                    status: FileStatus::InProgress,
                }],
            },
            DownloadEvent::Complete,
        ] {
            adapter.on_progress(&ProgressEvent::Download(e));
        }
        let got = rec.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(
            got,
            [
                "start model.safetensors 100",
                "advance model.safetensors 40/100",
                "finish model.safetensors"
            ]
        );
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
