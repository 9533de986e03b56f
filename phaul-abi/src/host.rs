//! The plugin's side of the host's services: the `log` crate's macros in a plugin reach phaul's log (and
//! `--log-file`) under the plugin's name, and [`Host::progress`] reaches the progress display and the report.

use std::sync::OnceLock;

use abi_stable::std_types::RStr;

use crate::ffi::HostServicesRef;

/// The host's services, as a driver sees them.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    services: HostServicesRef,
    plugin: &'static str,
}

impl Host {
    /// The services in `services`, used under the name `plugin`.
    pub fn new(services: HostServicesRef, plugin: &'static str) -> Host {
        Host { services, plugin }
    }

    /// The host's interface revision.
    pub fn abi_version(&self) -> u32 {
        self.services.abi_version()
    }

    /// Whether the host offers a service (`log`, `progress`...).
    pub fn has(&self, service: &str) -> bool {
        (self.services.has())(RStr::from_str(service))
    }

    /// A log line in phaul's log.
    pub fn log(&self, level: log::Level, message: &str) {
        (self.services.log())(level as u8, RStr::from_str(self.plugin), RStr::from_str(message));
    }

    /// Reports progress: `done` of `total` (0: unknown) bytes or items of `what`. A no-op on a host without it.
    pub fn progress(&self, what: &str, done: u64, total: u64) {
        if self.has("progress") {
            (self.services.progress())(RStr::from_str(self.plugin), RStr::from_str(what), done, total);
        }
    }
}

struct Bridge(Host);

impl log::Log for Bridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.log(record.level(), &record.args().to_string());
    }
    fn flush(&self) {}
}

static BRIDGE: OnceLock<()> = OnceLock::new();

/// Makes the `log` crate's macros in this plugin library write to the host's log (once; later calls do nothing).
/// The export macro calls this when the host first creates a driver.
pub fn install_logger(services: HostServicesRef, plugin: &'static str) {
    BRIDGE.get_or_init(|| {
        let bridge: &'static Bridge = Box::leak(Box::new(Bridge(Host::new(services, plugin))));
        if log::set_logger(bridge).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
}
