//! The plugin host: reads `plugins.toml`, loads each listed driver library on its own, checks it, and creates
//! driver objects from it.
//!
//! ```toml
//! [[plugin]]
//! path = "target/release/libphaul_htype_pid.so"   # relative paths start at this file's directory
//! enabled = true                                   # the default
//!
//! [host-type.pid]
//! fs = "shared"                                    # used unless `--fs` says otherwise
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::std_types::{RResult, RString, RVec};
use phaul_abi::{
    FsArgs, FsReceiverBox, FsSenderBox, HostTypeArgs, HostTypeBox, KeyValue, Mode, PluginError, PluginKind,
    PluginModuleRef, Role, PHAUL_ABI_OLDEST, PHAUL_ABI_VERSION,
};
use serde::Deserialize;

/// The system configuration directory phaul reads `phaul/plugins.toml`, `phaul/plugins.d/*.toml` and
/// `phaul/phaul.toml` from unless `--sysconfdir` names another: `/etc`, or what `PHAUL_SYSCONFDIR` said when
/// phaul was built (`scripts/install --sysconfdir`).
pub const DEFAULT_SYSCONFDIR: &str = match option_env!("PHAUL_SYSCONFDIR") {
    Some(d) => d,
    None => "/etc",
};

#[derive(Debug, thiserror::Error)]
pub enum PluginLoadError {
    #[error("no plugin list found: $PHAUL_PLUGINS is not set and neither {main} nor any {dir}/*.toml exists; install phaul (scripts/install), or pass a list with --plugins FILE (the repository's own is plugins.toml at its root)")]
    NoConfig { main: PathBuf, dir: PathBuf },
    #[error("cannot read the plugin list {path}: {source}; pass another with --plugins FILE")]
    ConfigRead { path: PathBuf, source: std::io::Error },
    #[error("refusing the plugin list {path}: {why}")]
    ConfigUnsafe { path: PathBuf, why: String },
    #[error("refusing the plugin file {file} (listed in {config}): {why}")]
    PluginUnsafe { file: PathBuf, config: PathBuf, why: String },
    #[error("{path} is not a valid plugin list: {message}")]
    ConfigParse { path: PathBuf, message: String },
    #[error("plugin file {file} (listed in {config}) does not exist; build it (scripts/setup builds every plugin) or set `enabled = false` on its entry")]
    Missing { file: PathBuf, config: PathBuf },
    #[error("{file} (listed in {config}) cannot be loaded as a shared library: {detail}; list the .so file cargo built for the plugin")]
    NotALibrary { file: PathBuf, config: PathBuf, detail: String },
    #[error("{file} (listed in {config}) is not a phaul plugin: it exports no phaul root module; list only libraries built with phaul_abi::export_host_type! or export_fs_driver!")]
    NotAPlugin { file: PathBuf, config: PathBuf },
    #[error("{file} was built against an incompatible plugin ABI ({detail}); rebuild it against a phaul-abi of interface revision {oldest} to {newest} (the one that ships with this phaul is {newest})")]
    Incompatible { file: PathBuf, detail: String, newest: u32, oldest: u32 },
    #[error("{file} (listed in {config}) exports its root module without a type layout (abi_stable's `unsafe_no_layout_constant`), so phaul cannot check it; rebuild it with phaul_abi::export_plugin!")]
    NoLayout { file: PathBuf, config: PathBuf },
    #[error("{file} was built against phaul plugin interface revision {found}, newer than this phaul's {newest}; upgrade phaul, or rebuild the plugin against a phaul-abi of revision {newest} or older (down to {oldest})")]
    AbiTooNew { file: PathBuf, found: u32, newest: u32, oldest: u32 },
    #[error("{file} was built against phaul plugin interface revision {found}, older than the oldest this phaul loads ({oldest}; it speaks up to {newest}); rebuild the plugin against the phaul-abi that ships with this phaul")]
    AbiTooOld { file: PathBuf, found: u32, newest: u32, oldest: u32 },
    #[error("two plugins are named '{name}': {first} and {second}; disable one of them in {config}")]
    Duplicate { name: String, first: PathBuf, second: PathBuf, config: PathBuf },
    #[error("no {kind} named '{name}' is installed and enabled (plugin lists read: {config}); {}; install the package that ships it (e.g. phaul-{name}), or list its library in a plugin list", available_list(available))]
    NotEnabled { kind: &'static str, name: String, available: Vec<String>, config: String },
    #[error("the {kind} plugin '{name}' failed: {error}")]
    Driver { kind: &'static str, name: String, error: PluginError },
}

fn available_list(a: &[String]) -> String {
    if a.is_empty() {
        "none of that kind is enabled".to_string()
    } else {
        format!("enabled of that kind: {}", a.join(", "))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginsFile {
    #[serde(default)]
    plugin: Vec<PluginEntry>,
    #[serde(default, rename = "host-type")]
    host_type: BTreeMap<String, HostTypeDefaults>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginEntry {
    path: PathBuf,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostTypeDefaults {
    fs: String,
}

/// One loaded driver (a library may carry several).
#[derive(Clone)]
pub struct LoadedPlugin {
    pub kind: PluginKind,
    pub name: String,
    pub version: String,
    pub description: String,
    pub path: PathBuf,
    /// The interface revision the library was built against.
    pub abi_version: u32,
    module: PluginModuleRef,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("abi_version", &self.abi_version)
            .field("path", &self.path)
            .finish()
    }
}

/// A plugin listed but not enabled.
#[derive(Debug, Clone)]
pub struct DisabledPlugin {
    pub path: PathBuf,
}

/// The plugins of the plugin lists read (`plugins.toml`, then its `plugins.d` snippets).
#[derive(Debug)]
pub struct Registry {
    config: PathBuf,
    files: Vec<PathBuf>,
    plugins: Vec<LoadedPlugin>,
    disabled: Vec<DisabledPlugin>,
    default_fs: BTreeMap<String, String>,
}

/// Finds the plugin lists to read, in order: the explicit path alone; else `$PHAUL_PLUGINS` alone; else
/// `SYSCONFDIR/phaul/plugins.toml` (if it exists) followed by `SYSCONFDIR/phaul/plugins.d/*.toml` in sorted order
/// (what driver packages drop in). Never the working directory: phaul runs as root and loads that code.
pub fn find_configs(explicit: Option<&Path>, sysconfdir: &Path) -> Result<Vec<PathBuf>, PluginLoadError> {
    if let Some(p) = explicit {
        return Ok(vec![p.to_path_buf()]);
    }
    if let Some(p) = std::env::var_os("PHAUL_PLUGINS").filter(|v| !v.is_empty()) {
        return Ok(vec![PathBuf::from(p)]);
    }
    let main = sysconfdir.join("phaul/plugins.toml");
    let dir = sysconfdir.join("phaul/plugins.d");
    let mut files = Vec::new();
    if main.is_file() {
        files.push(main.clone());
    }
    let mut snippets: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    snippets.sort();
    files.extend(snippets);
    if files.is_empty() {
        return Err(PluginLoadError::NoConfig { main, dir });
    }
    Ok(files)
}

/// What a `plugins.toml` lists, parsed and checked, before any library is loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginList {
    /// The `[[plugin]]` entries, in file order.
    pub plugins: Vec<PluginListEntry>,
    /// The filesystem driver each host type uses unless `--fs` says otherwise (`[host-type.NAME] fs = ...`).
    pub default_fs: BTreeMap<String, String>,
}

/// One `[[plugin]]` entry of a [`PluginList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginListEntry {
    /// The library; a relative path in the file is joined to the file's directory.
    pub path: PathBuf,
    pub enabled: bool,
}

/// Parses the text of a plugin list read from `config` (named in errors; relative paths start at its directory),
/// loading nothing: what [`Registry::load`] does before it loads the enabled libraries.
pub fn parse_plugin_list(text: &str, config: &Path) -> Result<PluginList, PluginLoadError> {
    let file: PluginsFile = toml::from_str(text).map_err(|e| PluginLoadError::ConfigParse {
        path: config.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let base = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let plugins = file
        .plugin
        .into_iter()
        .map(|entry| PluginListEntry {
            path: if entry.path.is_absolute() { entry.path } else { base.join(&entry.path) },
            enabled: entry.enabled,
        })
        .collect();
    let default_fs = file.host_type.into_iter().map(|(k, v)| (k, v.fs)).collect();
    Ok(PluginList { plugins, default_fs })
}

fn to_rvec(kvs: &[(String, String)]) -> RVec<KeyValue> {
    kvs.iter().map(|(k, v)| KeyValue { key: RString::from(k.as_str()), value: RString::from(v.as_str()) }).collect()
}

/// The largest plugin list phaul reads.
pub const MAX_PLUGIN_LIST_BYTES: u64 = 1 << 20;

/// Why a file phaul is about to trust with root's powers (a plugin list, a plugin library) must not be trusted:
/// it is not a regular file, belongs to someone other than root or this user, or can be changed by group or others
/// (or sits in a directory they can change without the sticky bit). `None` when it is fine.
pub fn unsafe_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(format!("cannot inspect it: {e}")),
    };
    if !meta.is_file() {
        return Some("it is not a regular file".into());
    }
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 && meta.uid() != me {
        return Some(format!(
            "it belongs to uid {}, not to root{}; phaul runs plugin code with its own privileges: `chown root {}`",
            meta.uid(),
            if me == 0 { String::new() } else { format!(" or uid {me}") },
            path.display()
        ));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "group or others may write it (mode {mode:04o}); phaul runs plugin code with its own privileges: `chmod go-w {}`",
            path.display()
        ));
    }
    // Every directory on the way to the file itself (a symbolic link's target, not the link), from the root
    // down: each must belong to root or this user, and not be changeable by group or others unless sticky; else
    // whoever may change it could swap the file.
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    for dir in real.ancestors().skip(1) {
        let Ok(d) = std::fs::metadata(dir) else { continue };
        let dmode = d.mode() & 0o7777;
        if d.uid() != 0 && d.uid() != me {
            return Some(format!(
                "its directory {} belongs to uid {}, who could swap the file; phaul runs plugin code with its own privileges: `chown root {}`",
                dir.display(),
                d.uid(),
                dir.display()
            ));
        }
        if dmode & 0o022 != 0 && dmode & 0o1000 == 0 {
            return Some(format!(
                "its directory {} may be changed by group or others (mode {dmode:04o}), who could swap the file: `chmod go-w {}`",
                dir.display(),
                dir.display()
            ));
        }
    }
    None
}

/// Reads a plugin list, refusing one that is unsafe (see [`unsafe_file`]) or larger than
/// [`MAX_PLUGIN_LIST_BYTES`].
fn read_plugin_list(config: &Path) -> Result<String, PluginLoadError> {
    use std::io::Read;
    if let Some(why) = unsafe_file(config) {
        return Err(PluginLoadError::ConfigUnsafe { path: config.to_path_buf(), why });
    }
    let f = std::fs::File::open(config)
        .map_err(|source| PluginLoadError::ConfigRead { path: config.to_path_buf(), source })?;
    let mut text = String::new();
    f.take(MAX_PLUGIN_LIST_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| PluginLoadError::ConfigRead { path: config.to_path_buf(), source })?;
    if text.len() as u64 > MAX_PLUGIN_LIST_BYTES {
        return Err(PluginLoadError::ConfigUnsafe {
            path: config.to_path_buf(),
            why: format!("it is larger than {} KiB; a plugin list is a few lines", MAX_PLUGIN_LIST_BYTES >> 10),
        });
    }
    Ok(text)
}

impl Registry {
    /// Reads `config` and loads every enabled plugin it lists.
    pub fn load(config: &Path) -> Result<Registry, PluginLoadError> {
        Registry::load_all(&[config.to_path_buf()])
    }

    /// Reads the plugin lists in order (see [`find_configs`]) and loads every enabled plugin they list; a host
    /// type's default filesystem driver in a later list wins over an earlier one's.
    pub fn load_all(configs: &[PathBuf]) -> Result<Registry, PluginLoadError> {
        let mut plugins: Vec<LoadedPlugin> = Vec::new();
        let mut disabled = Vec::new();
        let mut default_fs = BTreeMap::new();
        let mut main_defaults = BTreeMap::new();
        for config in configs {
            let text = read_plugin_list(config)?;
            let list = parse_plugin_list(&text, config)?;
            // A package's snippet (plugins.d) whose library is gone (the package removed, its snippet kept) only
            // disables that entry; a missing library in a list an operator names is an error.
            let snippet = config.parent().and_then(Path::file_name).is_some_and(|d| d == "plugins.d");
            for PluginListEntry { path, enabled } in list.plugins {
                if !enabled {
                    disabled.push(DisabledPlugin { path });
                    continue;
                }
                if plugins.iter().any(|q| q.path == path) {
                    // The same library listed twice (a main list and a package's snippet): loaded once.
                    continue;
                }
                if snippet && !path.exists() {
                    log::warn!(
                        "{} lists {}, which is not installed (its package removed?); that entry is skipped",
                        config.display(),
                        path.display()
                    );
                    disabled.push(DisabledPlugin { path });
                    continue;
                }
                for p in load_one(&path, config)? {
                    if let Some(first) = plugins.iter().find(|q| q.name == p.name) {
                        return Err(PluginLoadError::Duplicate {
                            name: p.name,
                            first: first.path.clone(),
                            second: path,
                            config: config.to_path_buf(),
                        });
                    }
                    plugins.push(p);
                }
            }
            if snippet {
                default_fs.extend(list.default_fs);
            } else {
                main_defaults.extend(list.default_fs);
            }
        }
        // An operator's own list (not a package's snippet) has the last word on defaults.
        default_fs.extend(main_defaults);
        let config = configs.first().cloned().unwrap_or_default();
        Ok(Registry { config, files: configs.to_vec(), plugins, disabled, default_fs })
    }

    /// The first plugin list read.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Every plugin list read, in order.
    pub fn config_files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn plugins(&self) -> &[LoadedPlugin] {
        &self.plugins
    }

    pub fn disabled(&self) -> &[DisabledPlugin] {
        &self.disabled
    }

    /// The filesystem driver `plugins.toml` names for a host type.
    pub fn default_fs(&self, htype: &str) -> Option<&str> {
        self.default_fs.get(htype).map(String::as_str)
    }

    fn find(&self, kind: PluginKind, name: &str) -> Result<&LoadedPlugin, PluginLoadError> {
        self.plugins.iter().find(|p| p.kind == kind && p.name == name).ok_or_else(|| PluginLoadError::NotEnabled {
            kind: kind_word(kind),
            name: name.to_string(),
            available: self.plugins.iter().filter(|p| p.kind == kind).map(|p| p.name.clone()).collect(),
            config: self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
        })
    }

    /// Fails unless a plugin of that kind and name is enabled.
    pub fn ensure(&self, kind: PluginKind, name: &str) -> Result<(), PluginLoadError> {
        self.find(kind, name).map(|_| ())
    }

    /// Creates a host-type driver.
    pub fn new_host_type(
        &self,
        name: &str,
        role: Role,
        mode: Mode,
        id: &str,
        options: &[(String, String)],
        work_dir: &Path,
    ) -> Result<HostTypeBox, PluginLoadError> {
        self.new_host_type_with(name, role, mode, id, options, &[], work_dir)
    }

    /// [`Registry::new_host_type`] with `more` arguments (see [`OWN_OPTIONS_FROM`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new_host_type_with(
        &self,
        name: &str,
        role: Role,
        mode: Mode,
        id: &str,
        options: &[(String, String)],
        more: &[(String, String)],
        work_dir: &Path,
    ) -> Result<HostTypeBox, PluginLoadError> {
        let p = self.find(PluginKind::HOST_TYPE, name)?;
        let args = HostTypeArgs {
            role,
            mode,
            id: id.into(),
            options: to_rvec(options),
            work_dir: work_dir.to_string_lossy().as_ref().into(),
            host: services::host_services(),
            more: to_rvec(more),
        };
        driver_result(name, "host type", (p.module.new_host_type())(name.into(), &args))
    }

    fn fs_args(
        role: Role,
        mode: Mode,
        options: &[(String, String)],
        data_fd: Option<i32>,
        roots: &[String],
        work_dir: &Path,
    ) -> FsArgs {
        FsArgs {
            role,
            mode,
            options: to_rvec(options),
            data_fd: data_fd.unwrap_or(-1),
            roots: roots.iter().map(|r| RString::from(r.as_str())).collect(),
            work_dir: work_dir.to_string_lossy().as_ref().into(),
            host: services::host_services(),
            more: RVec::new(),
        }
    }

    /// Creates the sending half of a filesystem driver.
    pub fn new_fs_sender(
        &self,
        name: &str,
        mode: Mode,
        options: &[(String, String)],
        data_fd: Option<i32>,
        roots: &[String],
        work_dir: &Path,
    ) -> Result<FsSenderBox, PluginLoadError> {
        let p = self.find(PluginKind::FS_DRIVER, name)?;
        let args = Self::fs_args(Role::SOURCE, mode, options, data_fd, roots, work_dir);
        driver_result(name, "filesystem driver", (p.module.new_fs_sender())(name.into(), &args))
    }

    /// Creates the receiving half of a filesystem driver.
    pub fn new_fs_receiver(
        &self,
        name: &str,
        mode: Mode,
        options: &[(String, String)],
        data_fd: Option<i32>,
        roots: &[String],
        work_dir: &Path,
    ) -> Result<FsReceiverBox, PluginLoadError> {
        let p = self.find(PluginKind::FS_DRIVER, name)?;
        let args = Self::fs_args(Role::DESTINATION, mode, options, data_fd, roots, work_dir);
        driver_result(name, "filesystem driver", (p.module.new_fs_receiver())(name.into(), &args))
    }
}

fn kind_word(k: PluginKind) -> &'static str {
    match k {
        PluginKind::HOST_TYPE => "host type",
        PluginKind::FS_DRIVER => "filesystem driver",
        _ => "driver",
    }
}

fn driver_result<T>(name: &str, kind: &'static str, r: RResult<T, PluginError>) -> Result<T, PluginLoadError> {
    r.into_result().map_err(|error| PluginLoadError::Driver { kind, name: name.to_string(), error })
}

/// Loads one library on its own (abi_stable's `RootModule::load_from*` would cache one module per interface type,
/// and every phaul plugin shares one interface type).
fn load_one(path: &Path, config: &Path) -> Result<Vec<LoadedPlugin>, PluginLoadError> {
    if !path.exists() {
        return Err(PluginLoadError::Missing { file: path.to_path_buf(), config: config.to_path_buf() });
    }
    if let Some(why) = unsafe_file(path) {
        return Err(PluginLoadError::PluginUnsafe { file: path.to_path_buf(), config: config.to_path_buf(), why });
    }
    let header = lib_header_from_path(path).map_err(|e| match e {
        LibraryError::OpenError { err, .. } => PluginLoadError::NotALibrary {
            file: path.to_path_buf(),
            config: config.to_path_buf(),
            detail: err.to_string(),
        },
        LibraryError::GetSymbolError { .. } => {
            PluginLoadError::NotAPlugin { file: path.to_path_buf(), config: config.to_path_buf() }
        }
        other => incompatible(path, other),
    })?;
    let module = checked_root_module(header).map_err(|e| match e {
        Unchecked::NoLayout => PluginLoadError::NoLayout { file: path.to_path_buf(), config: config.to_path_buf() },
        Unchecked::Library(e) => incompatible(path, e),
        Unchecked::Layout(detail) => incompatible_detail(path, &layout_summary(&detail)),
    })?;
    let found = module.abi_version();
    let (file, newest, oldest) = (path.to_path_buf(), PHAUL_ABI_VERSION, PHAUL_ABI_OLDEST);
    if found > PHAUL_ABI_VERSION {
        return Err(PluginLoadError::AbiTooNew { file, found, newest, oldest });
    }
    if found < PHAUL_ABI_OLDEST {
        return Err(PluginLoadError::AbiTooOld { file, found, newest, oldest });
    }
    let infos = (module.drivers())();
    if infos.is_empty() {
        return Err(PluginLoadError::NotAPlugin { file: path.to_path_buf(), config: config.to_path_buf() });
    }
    Ok(infos
        .into_iter()
        .map(|info| {
            log::debug!(
                "loaded {} driver {} {} (interface revision {found}) from {}",
                info.kind.as_str(),
                info.name,
                info.version,
                path.display()
            );
            LoadedPlugin {
                kind: info.kind,
                name: info.name.into_string(),
                version: info.version.into_string(),
                description: info.description.into_string(),
                path: path.to_path_buf(),
                abi_version: found,
                module,
            }
        })
        .collect())
}

fn incompatible(path: &Path, e: LibraryError) -> PluginLoadError {
    incompatible_detail(path, &e.to_string())
}

fn incompatible_detail(path: &Path, detail: &str) -> PluginLoadError {
    let detail = detail.lines().map(str::trim).filter(|l| !l.is_empty()).take(6).collect::<Vec<_>>().join(" ");
    PluginLoadError::Incompatible {
        file: path.to_path_buf(),
        detail,
        newest: PHAUL_ABI_VERSION,
        oldest: PHAUL_ABI_OLDEST,
    }
}

/// The gist of abi_stable's (very long) account of a layout mismatch: for each error, the type and what differs,
/// `VTable: too many fields (expected 17, found 16)`.
fn layout_summary(detail: &str) -> String {
    let lines: Vec<&str> = detail.lines().map(str::trim).collect();
    let mut out: Vec<String> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(what) = l.strip_prefix("Error:") else { continue };
        let ty = lines[..i]
            .iter()
            .rposition(|l| l.starts_with("Layout of expected type"))
            .and_then(|at| lines[at..i].iter().find_map(|l| l.strip_prefix("type:")))
            .unwrap_or("a type");
        let value = |label: &str| {
            lines[i..].iter().position(|l| *l == label).and_then(|at| lines.get(i + at + 1)).copied().unwrap_or("?")
        };
        let one = format!("{ty}: {} (expected {}, found {})", what.trim(), value("Expected:"), value("Found:"));
        if !out.contains(&one) {
            out.push(one);
        }
    }
    // A field count is only news when nothing else differs.
    if out.iter().any(|o| !o.contains("too many fields")) {
        out.retain(|o| !o.contains("too many fields"));
    }
    out.truncate(3);
    if out.is_empty() {
        detail.to_string()
    } else {
        format!("the layouts differ: {}", out.join("; "))
    }
}

/// Why [`checked_root_module`] refused a library.
enum Unchecked {
    /// The library exports no layout of its root module.
    NoLayout,
    /// abi_stable's own version check, or the root module's constructor, failed.
    Library(LibraryError),
    /// The layouts differ by more than fields appended to prefix types.
    Layout(String),
}

/// The root module of a library, once its layout is known to be safe for this host.
///
/// abi_stable's own check (`LibHeader::init_root_module`) accepts a library only if every prefix type of it (the
/// root module, the drivers' vtables, the host services) has at least the fields the host's copy of phaul-abi
/// has: a library built against a newer minor version of the interface, never an older one. phaul wants the
/// opposite as well, a newer host loading older plugins (the fields and methods a plugin lacks read as absent and
/// fall back to their defaults, since prefix types carry their field count at run time). So the layout is checked
/// in both directions and accepted when either holds: the plugin's prefix types are all a prefix of the host's
/// (an older plugin), or the host's of the plugin's (a newer one, which the revision check then refuses with
/// both revisions named). Everything that is not a prefix type must match exactly either way.
fn checked_root_module(header: &'static abi_stable::library::LibHeader) -> Result<PluginModuleRef, Unchecked> {
    use abi_stable::abi_stability::check_layout_compatibility;
    use abi_stable::StableAbi;
    let found = header.layout().ok_or(Unchecked::NoLayout)?;
    let host = <PluginModuleRef as StableAbi>::LAYOUT;
    // abi_stable merges every prefix type it checks into one table for the process. When the first library it
    // meets is older than the host, the table keeps the older, shorter form and every later library with the
    // host's own layout is refused ("too many fields"; seen with abi_stable 0.11.3). Checking the host's layout
    // against itself first puts the host's full form in the table; older and newer libraries then merge into it.
    static PRIMED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PRIMED
        .get_or_init(|| check_layout_compatibility(host, host).into_result().map_err(|e| e.to_string()))
        .clone()
        .map_err(Unchecked::Layout)?;
    if let Err(older) = check_layout_compatibility(found, host).into_result() {
        if let Err(newer) = check_layout_compatibility(host, found).into_result() {
            // Each direction also complains that the other side has more fields; what else differs is the news.
            return Err(Unchecked::Layout(format!("{older}\n{newer}")));
        }
    }
    // SAFETY: the root module's layout (and with it every type reachable from it) was checked just above against
    // the host's, in the direction that fits; this call still checks abi_stable's version strings.
    unsafe { header.init_root_module_with_unchecked_layout::<PluginModuleRef>() }.map_err(Unchecked::Library)
}

pub use phaul_abi::OWN_OPTIONS_FROM;

/// Creating drivers: what the engine needs of the plugin host (a seam, so that engine tests can hand it drivers
/// built in the test itself).
pub trait Drivers: Send + Sync {
    fn host_type(
        &self,
        name: &str,
        role: Role,
        mode: Mode,
        id: &str,
        options: &[(String, String)],
        work_dir: &Path,
    ) -> Result<HostTypeBox, PluginLoadError>;
    /// A destination's host type: `options` are the source's, then from index `own_from` this host's own.
    #[allow(clippy::too_many_arguments)]
    fn destination_host_type(
        &self,
        name: &str,
        mode: Mode,
        id: &str,
        options: &[(String, String)],
        own_from: usize,
        work_dir: &Path,
    ) -> Result<HostTypeBox, PluginLoadError> {
        let _ = own_from;
        self.host_type(name, Role::DESTINATION, mode, id, options, work_dir)
    }
    fn fs_sender(
        &self,
        name: &str,
        mode: Mode,
        options: &[(String, String)],
        data_fd: Option<i32>,
        roots: &[String],
        work_dir: &Path,
    ) -> Result<FsSenderBox, PluginLoadError>;
    fn fs_receiver(
        &self,
        name: &str,
        mode: Mode,
        options: &[(String, String)],
        data_fd: Option<i32>,
        roots: &[String],
        work_dir: &Path,
    ) -> Result<FsReceiverBox, PluginLoadError>;
    /// The filesystem driver a host type uses unless `--fs` says otherwise.
    fn default_fs(&self, htype: &str) -> Option<String>;
    /// Fails unless a filesystem driver of that name is enabled.
    fn ensure_fs(&self, name: &str) -> Result<(), PluginLoadError>;
    /// Fails unless a host type of that name is enabled (for `phaul check`; a driver set that cannot tell says
    /// yes, and creating the driver tells later).
    fn ensure_htype(&self, name: &str) -> Result<(), PluginLoadError> {
        let _ = name;
        Ok(())
    }
    /// The plugin list, for messages.
    fn config_path(&self) -> PathBuf;
}

impl Drivers for Registry {
    fn ensure_htype(&self, name: &str) -> Result<(), PluginLoadError> {
        self.ensure(PluginKind::HOST_TYPE, name)
    }
    fn host_type(
        &self,
        name: &str,
        role: Role,
        mode: Mode,
        id: &str,
        options: &[(String, String)],
        work_dir: &Path,
    ) -> Result<HostTypeBox, PluginLoadError> {
        self.new_host_type(name, role, mode, id, options, work_dir)
    }
    fn destination_host_type(
        &self,
        name: &str,
        mode: Mode,
        id: &str,
        options: &[(String, String)],
        own_from: usize,
        work_dir: &Path,
    ) -> Result<HostTypeBox, PluginLoadError> {
        let more = [(OWN_OPTIONS_FROM.to_string(), own_from.to_string())];
        self.new_host_type_with(name, Role::DESTINATION, mode, id, options, &more, work_dir)
    }
    fn fs_sender(
        &self,
        name: &str,
        mode: Mode,
        options: &[(String, String)],
        data_fd: Option<i32>,
        roots: &[String],
        work_dir: &Path,
    ) -> Result<FsSenderBox, PluginLoadError> {
        self.new_fs_sender(name, mode, options, data_fd, roots, work_dir)
    }
    fn fs_receiver(
        &self,
        name: &str,
        mode: Mode,
        options: &[(String, String)],
        data_fd: Option<i32>,
        roots: &[String],
        work_dir: &Path,
    ) -> Result<FsReceiverBox, PluginLoadError> {
        self.new_fs_receiver(name, mode, options, data_fd, roots, work_dir)
    }
    fn default_fs(&self, htype: &str) -> Option<String> {
        Registry::default_fs(self, htype).map(str::to_string)
    }
    fn ensure_fs(&self, name: &str) -> Result<(), PluginLoadError> {
        self.ensure(PluginKind::FS_DRIVER, name)
    }
    fn config_path(&self) -> PathBuf {
        Registry::config_path(self).to_path_buf()
    }
}

/// The host type's CRIU options for a stage, read from the list that crossed the boundary.
pub fn criu_options(ht: &mut HostTypeBox, stage: phaul_abi::CriuStage) -> RResult<phaul_abi::CriuOptions, PluginError> {
    match ht.criu_options(stage).into_result() {
        Ok(list) => match phaul_abi::CriuOptions::from_list(&list) {
            Ok(o) => RResult::ROk(o),
            Err(e) => RResult::RErr(PluginError::invalid(e)),
        },
        Err(e) => RResult::RErr(e),
    }
}

/// Forwards one of CRIU's notifications to the host type.
pub fn notify(ht: &mut HostTypeBox, script: &str, pid: Option<i32>, fd: Option<i32>) -> RResult<(), PluginError> {
    let n = phaul_abi::Notification {
        script: script.into(),
        pid: pid.unwrap_or(0),
        fd: fd.unwrap_or(-1),
        more: RVec::new(),
    };
    ht.notify(&n)
}

/// The description of filesystem round `number`.
pub fn fs_round_info(number: u32, is_final: bool) -> phaul_abi::FsRoundInfo {
    phaul_abi::FsRoundInfo { number, is_final, more: RVec::new() }
}

/// The services phaul offers its plugins (see [`phaul_abi::HostServices`]): their log lines go to phaul's log
/// under `plugin:NAME`; their progress is logged there too, kept for the report ([`services::plugin_progress`])
/// and passed to whoever listens ([`services::set_progress_sink`], the progress display).
pub mod services {
    use std::sync::{Mutex, OnceLock};

    use abi_stable::prefix_type::PrefixTypeTrait;
    use abi_stable::std_types::RStr;
    use phaul_abi::{HostServices, HostServicesRef, PHAUL_ABI_VERSION};

    /// Receives `(plugin, what, done, total)`.
    pub type ProgressSink = Box<dyn Fn(&str, &str, u64, u64) + Send + Sync>;

    fn sink() -> &'static Mutex<Option<ProgressSink>> {
        static SINK: OnceLock<Mutex<Option<ProgressSink>>> = OnceLock::new();
        SINK.get_or_init(|| Mutex::new(None))
    }

    /// Where plugins' progress reports go from now on (`None`: nowhere), besides the log and
    /// [`plugin_progress`].
    pub fn set_progress_sink(s: Option<ProgressSink>) {
        *sink().lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// The latest progress a plugin reported for one thing it does, for the report.
    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
    pub struct PluginProgress {
        /// The plugin library's name (as in its log lines).
        pub plugin: String,
        /// What the plugin said it is doing (`"rsync"`, `"zfs send"`...).
        pub what: String,
        /// Bytes (or items) done.
        pub done: u64,
        /// Of this many (0: unknown).
        pub total: u64,
        /// How many reports the plugin made for it.
        pub reports: u64,
    }

    fn latest() -> &'static Mutex<Vec<PluginProgress>> {
        static LATEST: OnceLock<Mutex<Vec<PluginProgress>>> = OnceLock::new();
        LATEST.get_or_init(|| Mutex::new(Vec::new()))
    }

    /// What plugins of this process last reported, one entry per plugin and thing, in the order they first
    /// reported. (One process is one migration for `phaul migrate`; `phaul serve` mixes its sessions here.)
    pub fn plugin_progress() -> Vec<PluginProgress> {
        latest().lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets what [`plugin_progress`] would return (at the start of a migration).
    pub fn clear_plugin_progress() {
        latest().lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Records one report; returns whether it is worth an info line (the first of its kind, or the one that
    /// completes it): a plugin may report thousands of times.
    fn record(plugin: &str, what: &str, done: u64, total: u64) -> bool {
        let mut all = latest().lock().unwrap_or_else(|p| p.into_inner());
        let complete = total > 0 && done >= total;
        match all.iter_mut().find(|p| p.plugin == plugin && p.what == what) {
            Some(p) => {
                let was_complete = p.total > 0 && p.done >= p.total;
                (p.done, p.total, p.reports) = (done, total, p.reports + 1);
                complete && !was_complete
            }
            None => {
                all.push(PluginProgress {
                    plugin: plugin.to_string(),
                    what: what.to_string(),
                    done,
                    total,
                    reports: 1,
                });
                true
            }
        }
    }

    extern "C" fn has(name: RStr<'_>) -> bool {
        matches!(name.as_str(), "log" | "progress")
    }

    extern "C" fn log_line(level: u8, plugin: RStr<'_>, message: RStr<'_>) {
        let level = match level {
            1 => log::Level::Error,
            2 => log::Level::Warn,
            3 => log::Level::Info,
            4 => log::Level::Debug,
            _ => log::Level::Trace,
        };
        let target = format!("plugin:{plugin}");
        log::log!(target: &target, level, "{message}");
    }

    extern "C" fn progress(plugin: RStr<'_>, what: RStr<'_>, done: u64, total: u64) {
        // The host's side of the boundary: nothing here may unwind into the plugin.
        let _ = std::panic::catch_unwind(|| {
            let (plugin, what) = (plugin.as_str(), what.as_str());
            let level = if record(plugin, what, done, total) { log::Level::Info } else { log::Level::Debug };
            let of = if total > 0 { format!(" of {total}") } else { String::new() };
            log::log!(target: &format!("plugin:{plugin}"), level, "progress of {what}: {done}{of}");
            if let Some(s) = sink().lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                s(plugin, what, done, total);
            }
        });
    }

    /// The services, made once for the life of the process.
    pub fn host_services() -> HostServicesRef {
        static S: OnceLock<HostServicesRef> = OnceLock::new();
        *S.get_or_init(|| {
            HostServices { abi_version: PHAUL_ABI_VERSION, has, log: log_line, progress }.leak_into_prefix()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_lists_are_the_sysconfdir_file_then_its_snippets_in_sorted_order_and_never_the_working_directory() {
        if std::env::var_os("PHAUL_PLUGINS").is_some() {
            eprintln!("PHAUL_PLUGINS is set; skipped");
            return;
        }
        let etc = tempfile::tempdir().expect("tempdir");
        let phaul = etc.path().join("phaul");
        let none = find_configs(None, etc.path()).expect_err("nothing there").to_string();
        assert!(none.contains("plugins.d") && none.contains("--plugins FILE"), "{none}");
        std::fs::create_dir_all(phaul.join("plugins.d")).expect("mkdir");
        for f in ["plugins.d/50-zfs.toml", "plugins.d/10-lxc.toml", "plugins.d/README", "plugins.toml"] {
            std::fs::write(phaul.join(f), "").expect("write");
        }
        let got = find_configs(None, etc.path()).expect("found");
        let want: Vec<PathBuf> =
            ["plugins.toml", "plugins.d/10-lxc.toml", "plugins.d/50-zfs.toml"].iter().map(|f| phaul.join(f)).collect();
        assert_eq!(got, want);
        // Snippets alone do (a packager may ship no main list); an explicit list stands alone.
        std::fs::remove_file(phaul.join("plugins.toml")).expect("rm");
        assert_eq!(find_configs(None, etc.path()).expect("snippets").len(), 2);
        let explicit = Path::new("/somewhere/list.toml");
        assert_eq!(find_configs(Some(explicit), etc.path()).expect("explicit"), vec![explicit.to_path_buf()]);
        // A plugins.toml in the working directory is not looked at.
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(find_configs(None, empty.path()).is_err());
    }

    #[test]
    fn a_later_list_sets_a_host_types_default_filesystem_driver_and_registry_names_every_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
        std::fs::write(&a, "[host-type.pid]\nfs = \"shared\"\n[host-type.lxc]\nfs = \"shared\"\n").expect("write");
        std::fs::write(&b, "[host-type.lxc]\nfs = \"rsync\"\n").expect("write");
        let r = Registry::load_all(&[a.clone(), b.clone()]).expect("load");
        assert_eq!(r.default_fs("lxc"), Some("rsync"));
        assert_eq!(r.default_fs("pid"), Some("shared"));
        assert_eq!(r.config_files(), &[a.clone(), b.clone()]);
        // A package's snippet does not override an operator's list, and its missing library is skipped.
        std::fs::create_dir_all(dir.path().join("plugins.d")).expect("mkdir");
        let snip = dir.path().join("plugins.d/50-lxc.toml");
        std::fs::write(
            &snip,
            "[[plugin]]\npath = \"/nonexistent/libphaul_htype_lxc.so\"\n[host-type.lxc]\nfs = \"zfs\"\n",
        )
        .expect("write");
        let r2 = Registry::load_all(&[a.clone(), snip]).expect("a stale snippet is not fatal");
        assert_eq!(r2.default_fs("lxc"), Some("shared"), "the operator's list wins");
        assert_eq!(r2.disabled().len(), 1);
        let msg = r.ensure(PluginKind::HOST_TYPE, "lxc").expect_err("none loaded").to_string();
        assert!(msg.contains("is installed and enabled") && msg.contains(&b.display().to_string()), "{msg}");
    }

    #[test]
    fn a_list_under_a_directory_others_may_change_is_refused_however_deep() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let open = dir.path().join("open");
        let deep = open.join("deep");
        std::fs::create_dir_all(&deep).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let list = deep.join("plugins.toml");
        std::fs::write(&list, "").expect("write");
        let why = unsafe_file(&list).expect("refused");
        assert!(why.contains(&open.display().to_string()), "{why}");
        // Through a symbolic link in a safe place, the target's directories are the ones checked.
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&list, &link).expect("symlink");
        assert!(unsafe_file(&link).is_some());
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(unsafe_file(&list), None);
    }

    #[test]
    fn malformed_toml_names_line_and_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("plugins.toml");
        std::fs::write(&p, "[[plugin]]\npath = \"x.so\"\nenabled = maybe\n").expect("write");
        let e = Registry::load(&p).expect_err("must fail");
        let msg = e.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("column"), "{msg}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("plugins.toml");
        std::fs::write(&p, "[[plugin]]\nfile = \"x.so\"\n").expect("write");
        let msg = Registry::load(&p).expect_err("must fail").to_string();
        assert!(msg.contains("unknown field `file`"), "{msg}");
    }

    #[test]
    fn missing_plugin_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("plugins.toml");
        std::fs::write(&p, "[[plugin]]\npath = \"nope.so\"\n").expect("write");
        match Registry::load(&p) {
            Err(PluginLoadError::Missing { file, .. }) => assert_eq!(file, dir.path().join("nope.so")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_file_that_is_not_a_library_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("fake.so"), "not an ELF file").expect("write");
        let p = dir.path().join("plugins.toml");
        std::fs::write(&p, "[[plugin]]\npath = \"fake.so\"\n").expect("write");
        assert!(matches!(Registry::load(&p), Err(PluginLoadError::NotALibrary { .. })));
    }

    #[test]
    fn the_plugin_list_parses_without_loading() {
        let config = Path::new("/etc/phaul/plugins.toml");
        let text = "[[plugin]]\npath = \"a.so\"\n[[plugin]]\npath = \"/b.so\"\nenabled = false\n[host-type.pid]\nfs = \"shared\"\n";
        let list = parse_plugin_list(text, config).expect("parse");
        assert_eq!(
            list.plugins,
            vec![
                PluginListEntry { path: "/etc/phaul/a.so".into(), enabled: true },
                PluginListEntry { path: "/b.so".into(), enabled: false },
            ]
        );
        assert_eq!(list.default_fs.get("pid").map(String::as_str), Some("shared"));
        let msg = parse_plugin_list("[[plugin]]\nfile = 1\n", config).expect_err("must fail").to_string();
        assert!(msg.starts_with("/etc/phaul/plugins.toml is not a valid plugin list: "), "{msg}");
    }

    #[test]
    fn plugin_progress_is_kept_for_the_report_and_reaches_the_sink() {
        use std::sync::{Arc, Mutex};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        services::set_progress_sink(Some(Box::new(move |plugin, what, done, total| {
            if plugin == "progress-test" {
                s.lock().expect("lock").push((what.to_string(), done, total));
            }
        })));
        let host = phaul_abi::Host::new(services::host_services(), "progress-test");
        assert!(host.has("progress") && host.has("log") && !host.has("teleport"));
        assert_eq!(host.abi_version(), PHAUL_ABI_VERSION);
        for done in [0, 512, 1024] {
            host.progress("copy", done, 1024);
        }
        host.progress("scan", 7, 0);
        services::set_progress_sink(None);
        let mine: Vec<_> = services::plugin_progress().into_iter().filter(|p| p.plugin == "progress-test").collect();
        assert_eq!(
            mine,
            vec![
                services::PluginProgress {
                    plugin: "progress-test".into(),
                    what: "copy".into(),
                    done: 1024,
                    total: 1024,
                    reports: 3
                },
                services::PluginProgress {
                    plugin: "progress-test".into(),
                    what: "scan".into(),
                    done: 7,
                    total: 0,
                    reports: 1
                },
            ]
        );
        assert_eq!(seen.lock().expect("lock").len(), 4);
    }

    #[test]
    fn a_layout_mismatch_is_summed_up() {
        let detail = "Compared <this>:\n    --- Type Layout ---\n...\nLayout of expected type:\n    --- Type Layout ---\n    type:VTable\n    size:120 align:8\n...\nError:too many fields\nExpected:\n    17\nFound:\n    16\n";
        assert_eq!(layout_summary(detail), "the layouts differ: VTable: too many fields (expected 17, found 16)");
        assert_eq!(layout_summary("something else"), "something else");
        let both = format!("{detail}Layout of expected type:\n    type:FsRound\nError:unexpected field\nExpected:\n    bytes\nFound:\n    octets\n");
        assert_eq!(
            layout_summary(&both),
            "the layouts differ: FsRound: unexpected field (expected bytes, found octets)"
        );
    }

    #[test]
    fn disabled_plugins_are_not_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("plugins.toml");
        std::fs::write(&p, "[[plugin]]\npath = \"nope.so\"\nenabled = false\n[host-type.pid]\nfs = \"shared\"\n")
            .expect("write");
        let r = Registry::load(&p).expect("load");
        assert!(r.plugins().is_empty());
        assert_eq!(r.disabled().len(), 1);
        assert_eq!(r.default_fs("pid"), Some("shared"));
        match r.new_host_type("pid", Role::SOURCE, Mode::LIVE, "1", &[], dir.path()) {
            Err(e) => assert!(e.to_string().contains("no host type named 'pid' is installed and enabled"), "{e}"),
            Ok(_) => panic!("a disabled plugin was used"),
        }
    }
}
