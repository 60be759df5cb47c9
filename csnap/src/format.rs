//! `csnap format`: write an empty store for an origin.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use csnap_pools::BLOCK_SIZE_BYTES;
use csnap_store::disk::{device_size_bytes, FileDisk};
use csnap_store::layout::Label;
use csnap_store::{FormatOptions, StoreFullPolicy};

use crate::device::{hex, random_uuid, require_device, same_device};
use crate::size::human;
use crate::{error, output, FormatArgs, StoreFull, EXIT_FAILED, EXIT_USAGE};

/// A failed format: the message and the exit status.
struct Fail {
    message: String,
    code: u8,
}

fn usage(message: String) -> Fail {
    Fail {
        message,
        code: EXIT_USAGE,
    }
}

fn failed(message: String) -> Fail {
    Fail {
        message,
        code: EXIT_FAILED,
    }
}

pub fn run(args: &FormatArgs) -> ExitCode {
    match format(args) {
        Ok(text) => {
            if output(&text) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Err(f) => {
            error(&f.message);
            ExitCode::from(f.code)
        }
    }
}

/// How the store file comes to have its size.
enum Prepare {
    /// It exists with a size: use it as it is.
    AsIs(File),
    /// It exists and is empty: extend it to this size.
    Extend(File, u64),
    /// It does not exist: create it with this size.
    Create(u64),
}

/// The error of an `O_DIRECT` open: EINVAL means the file system refuses
/// direct I/O, which a shared device must support.
fn direct_open_error(what: &str, path: &std::path::Path, e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::EINVAL) {
        format!(
            "cannot {what} {}: direct I/O (O_DIRECT) is not supported here; a shared device must be reachable without the page cache",
            path.display()
        )
    } else {
        format!("cannot {what} {} for writing: {e}", path.display())
    }
}

fn format(a: &FormatArgs) -> Result<String, Fail> {
    let (origin_meta, origin_size) = origin_size(a)?;
    let prepare = prepare_store(a, &origin_meta)?;
    refuse_overwrite(a, &prepare)?;
    let opts = format_options(a, origin_size)?;
    // Validate the layout before a file is created or extended.
    let store_path = a.store.display();
    let size = match &prepare {
        Prepare::AsIs(file) => device_size_bytes(file)
            .map_err(|e| failed(format!("cannot read the size of store {store_path}: {e}")))?,
        Prepare::Extend(_, size) | Prepare::Create(size) => *size,
    };
    csnap_store::plan_layout(size, &opts)
        .map_err(|e| failed(format!("cannot format store {store_path}: {e}")))?;
    let (file, undo) = open_store(a, prepare)?;
    let label = write_format(a, file, &undo, &opts)?;
    let chunk = u64::from(label.chunk_size_bytes);
    let tail = origin_size % chunk;
    if tail != 0 {
        error(&format!(
            "warning: origin size {origin_size} is not a multiple of the chunk size {chunk}; \
             its last {tail} bytes are outside every chunk and not covered by snapshots"
        ));
    }
    Ok(summary(&a.store, &a.origin, &label, a.store_full))
}

/// The origin's metadata and size, opened for direct I/O: every node
/// reaches the origin around its page cache, so a file or device that
/// cannot do direct I/O is refused here, before a store is written.
fn origin_size(a: &FormatArgs) -> Result<(std::fs::Metadata, u64), Fail> {
    let origin_path = a.origin.display();
    let origin_meta = require_device(&a.origin, "origin").map_err(usage)?;
    let origin_size = csnap_sys::dio::open_direct(&a.origin, false)
        .map(|(f, _)| f)
        .map_err(|e| usage(format!("cannot open origin {origin_path}: {e}")))
        .and_then(|f| {
            device_size_bytes(&f)
                .map_err(|e| failed(format!("cannot read the size of origin {origin_path}: {e}")))
        })?;
    Ok((origin_meta, origin_size))
}

/// The store: existing (file or device, checked) or to be created.
fn prepare_store(a: &FormatArgs, origin_meta: &std::fs::Metadata) -> Result<Prepare, Fail> {
    let store_path = a.store.display();
    Ok(match std::fs::metadata(&a.store) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match a.store_size {
            Some(size) => Prepare::Create(size),
            None => {
                return Err(usage(format!(
                    "store {store_path} does not exist; give --store-size to create it"
                )))
            }
        },
        Err(e) => return Err(usage(format!("cannot open store {store_path}: {e}"))),
        Ok(_) => {
            let meta = require_device(&a.store, "store").map_err(usage)?;
            if same_device(origin_meta, &meta) {
                return Err(usage(format!(
                    "origin and store are the same file ({store_path}); the store needs its own file or device"
                )));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&a.store)
                .map_err(|e| usage(direct_open_error("open store", &a.store, &e)))?;
            let size = device_size_bytes(&file)
                .map_err(|e| failed(format!("cannot read the size of store {store_path}: {e}")))?;
            match (size, a.store_size) {
                (0, None) => {
                    return Err(usage(format!(
                        "store {store_path} is empty; give --store-size to size it"
                    )))
                }
                (0, Some(want)) if meta.is_file() => Prepare::Extend(file, want),
                (0, Some(_)) => {
                    return Err(usage(format!(
                        "store {store_path} is a block device of 0 bytes"
                    )))
                }
                (have, Some(want)) if want != have => {
                    return Err(usage(format!(
                        "store {store_path} already has {have} bytes; --store-size ({want}) applies only to a new or empty file"
                    )))
                }
                _ => Prepare::AsIs(file),
            }
        }
    })
}

/// An existing csnap store is kept unless --force.
fn refuse_overwrite(a: &FormatArgs, prepare: &Prepare) -> Result<(), Fail> {
    let store_path = a.store.display();
    if let Prepare::AsIs(file) = prepare {
        let copy = file
            .try_clone()
            .map_err(|e| failed(format!("cannot read store {store_path}: {e}")))?;
        let mut disk = FileDisk::new(copy)
            .map_err(|e| failed(format!("cannot read store {store_path}: {e}")))?;
        if let Ok(label) = csnap_store::read_label(&mut disk) {
            if !a.force {
                return Err(failed(format!(
                    "store {store_path} already holds a csnap store (uuid {}, origin of {} bytes); \
                     add --force to overwrite it and lose its snapshots",
                    hex(&label.store_uuid),
                    label.origin_size_bytes
                )));
            }
        }
    }
    Ok(())
}

/// The format options the flags say, with fresh uuids.
fn format_options(a: &FormatArgs, origin_size: u64) -> Result<FormatOptions, Fail> {
    Ok(FormatOptions {
        origin_size_bytes: origin_size,
        chunk_size_bytes: a.chunk_size,
        journal_blocks: a.journal_blocks,
        policy: match a.store_full {
            StoreFull::Refuse => StoreFullPolicy::Refuse,
            StoreFull::DeleteLowestPriority => StoreFullPolicy::DeleteLowestPriority,
        },
        store_uuid: random_uuid().map_err(failed)?,
        origin_uuid: random_uuid().map_err(failed)?,
        now_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// The store file, created or extended as `prepare` says; with what undoes
/// that if the format fails.
fn open_store(a: &FormatArgs, prepare: Prepare) -> Result<(File, Undo), Fail> {
    let store_path = a.store.display();
    Ok(match prepare {
        Prepare::AsIs(file) => (file, Undo::Nothing),
        Prepare::Extend(file, size) => {
            file.set_len(size).map_err(|e| {
                failed(format!(
                    "cannot extend store {store_path} to {size} bytes: {e}"
                ))
            })?;
            (file, Undo::Truncate)
        }
        Prepare::Create(size) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_DIRECT)
                .open(&a.store)
                .map_err(|e| {
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        // Created, but direct I/O cannot be used on it.
                        let _ = std::fs::remove_file(&a.store);
                        usage(direct_open_error("create store", &a.store, &e))
                    } else {
                        failed(format!("cannot create store {store_path}: {e}"))
                    }
                })?;
            if let Err(e) = file.set_len(size) {
                let _ = std::fs::remove_file(&a.store);
                return Err(failed(format!(
                    "cannot size store {store_path} to {size} bytes: {e}"
                )));
            }
            (file, Undo::Remove)
        }
    })
}

/// Formats the store; on failure undoes what `open_store` did.
fn write_format(
    a: &FormatArgs,
    file: File,
    undo: &Undo,
    opts: &FormatOptions,
) -> Result<Label, Fail> {
    let store_path = a.store.display();
    let undo_file = file.try_clone().ok();
    let mut no_direct_io = false;
    let result = FileDisk::new(file)
        .map_err(|e| {
            no_direct_io = matches!(e, csnap_store::disk::DiskError::DirectIoUnsupported);
            e.to_string()
        })
        .and_then(|mut disk| csnap_store::format(&mut disk, opts).map_err(|e| e.to_string()))
        .and_then(|label| {
            if matches!(undo, Undo::Remove) {
                sync_parent(&a.store)?;
            }
            Ok(label)
        });
    match result {
        Ok(label) => Ok(label),
        Err(e) => {
            match undo {
                Undo::Nothing => {}
                Undo::Truncate => {
                    if let Some(f) = undo_file {
                        let _ = f.set_len(0);
                    }
                }
                Undo::Remove => {
                    let _ = std::fs::remove_file(&a.store);
                }
            }
            let msg = format!("cannot format store {store_path}: {e}");
            Err(if no_direct_io {
                usage(msg)
            } else {
                failed(msg)
            })
        }
    }
}

enum Undo {
    Nothing,
    Truncate,
    Remove,
}

/// Makes a newly created store's directory entry durable.
fn sync_parent(store: &Path) -> Result<(), String> {
    let parent = match store.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync directory {}: {e}", parent.display()))
}

fn summary(store: &Path, origin: &Path, l: &Label, policy: StoreFull) -> String {
    let bs = BLOCK_SIZE_BYTES as u64;
    let chunk = u64::from(l.chunk_size_bytes);
    format!(
        "formatted csnap store {store}\n\
         \x20 store uuid    {store_uuid}\n\
         \x20 origin uuid   {origin_uuid}\n\
         \x20 origin        {origin}: {origin_bytes} bytes ({origin_chunks} chunks)\n\
         \x20 store size    {store_bytes} bytes ({store_human})\n\
         \x20 chunk size    {chunk} bytes ({chunk_human})\n\
         \x20 data chunks   {data_chunks} ({data_human})\n\
         \x20 metadata      {meta_blocks} blocks ({meta_human})\n\
         \x20 journal       {journal_blocks} blocks ({journal_human})\n\
         \x20 store full    {policy}\n",
        store = store.display(),
        store_uuid = hex(&l.store_uuid),
        origin_uuid = hex(&l.origin_uuid),
        origin = origin.display(),
        origin_bytes = l.origin_size_bytes,
        origin_chunks = l.origin_chunks(),
        store_bytes = l.store_size_bytes,
        store_human = human(l.store_size_bytes),
        chunk_human = human(chunk),
        data_chunks = l.data_chunks,
        data_human = human(l.data_chunks * chunk),
        meta_blocks = l.meta_blocks,
        meta_human = human(l.meta_blocks * bs),
        journal_blocks = l.journal_blocks,
        journal_human = human(l.journal_blocks * bs),
        policy = policy.name(),
    )
}
