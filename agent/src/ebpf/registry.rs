//! The outbound registry maps (`REGISTRY`, `REGISTRY_MODE`): in `REGISTRY_ONLY` mode,
//! connect4/6 refuse (EPERM) a connect to a destination that is not in `REGISTRY`. Input:
//! plain data, the mode and the destinations the mesh knows (an address at one port, or at
//! every port). Output: the two maps, written as a diff against what `REGISTRY` holds.
//!
//! The eBPF refusal is an early, cheap one; the proxy checks the same registry and stays
//! the authority. So every doubt falls back to "allow" (steer everything to the proxy),
//! and the order of the writes keeps a registered destination from ever being refused:
//! - the mode goes to `REGISTRY_ONLY` only once every entry is in;
//! - an update adds the new entries before it removes the stale ones (an entry that changes
//!   form, `ip:port` to `ip` at every port, is never missing), and when the map has no room
//!   for both it switches to "allow" for the time of the update;
//! - any failed write (map full, error) leaves the mode at "allow" before it is reported.

use std::{collections::BTreeSet, net::IpAddr};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use ebpf_common::{
    maps::{self, MAX_REGISTRY},
    registry::{
        REGISTRY_ANY_PORT, REGISTRY_MODE_ALLOW_ANY, REGISTRY_MODE_REGISTRY_ONLY, RegistryKey,
        RegistryMode,
    },
};

use super::{
    Error, addr_bytes,
    maps::{map_error, remove_if_present, typed},
};

/// Writer of the two registry maps.
pub(crate) struct Registry {
    entries: HashMap<MapData, RegistryKey, u8>,
    mode: Array<MapData, RegistryMode>,
    /// What `entries` holds, as this agent last wrote it. `None` until read from the map
    /// (a previous agent may have left entries) and after a failed write (the map then
    /// holds something in between).
    written: Option<BTreeSet<RegistryKey>>,
}

impl Registry {
    /// Takes the two maps out of the loaded object.
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, Error> {
        Ok(Self {
            entries: typed(ebpf, maps::REGISTRY)?,
            mode: typed(ebpf, maps::REGISTRY_MODE)?,
            written: None,
        })
    }

    /// With `registry_only`, makes `REGISTRY` hold exactly `registry` and then turns the
    /// refusal on; without, turns it off and empties `REGISTRY`. On any error the mode is
    /// left at "allow" (`Error::RegistryIncomplete`), or the error says it could not be.
    pub(crate) fn apply(
        &mut self,
        registry_only: bool,
        registry: impl IntoIterator<Item = (IpAddr, Option<u16>)>,
    ) -> Result<(), Error> {
        let result = if registry_only {
            let wanted: BTreeSet<RegistryKey> = registry.into_iter().map(key).collect();
            self.write(&wanted, REGISTRY_MODE_REGISTRY_ONLY)
        } else {
            // Mode first: an emptying map must not refuse what it no longer lists.
            self.set_mode(REGISTRY_MODE_ALLOW_ANY)
                .and_then(|()| self.write(&BTreeSet::new(), REGISTRY_MODE_ALLOW_ANY))
        };
        result.map_err(|error| {
            self.written = None;
            match self.set_mode(REGISTRY_MODE_ALLOW_ANY) {
                Ok(()) => Error::RegistryIncomplete(Box::new(error)),
                Err(fallback) => Error::RegistryStuck {
                    error: Box::new(error),
                    fallback: Box::new(fallback),
                },
            }
        })
    }

    /// Brings `REGISTRY` from what it holds to `wanted`, then sets `mode`.
    fn write(&mut self, wanted: &BTreeSet<RegistryKey>, mode: u32) -> Result<(), Error> {
        if wanted.len() > MAX_REGISTRY as usize {
            return Err(Error::RegistryTooLarge {
                count: wanted.len(),
                max: MAX_REGISTRY,
            });
        }
        let mut current = match self.written.take() {
            Some(written) => written,
            None => self.read()?,
        };
        let added: Vec<RegistryKey> = wanted.difference(&current).copied().collect();
        let stale: Vec<RegistryKey> = current.difference(wanted).copied().collect();
        let room = current.len() + added.len() <= MAX_REGISTRY as usize;
        if !room {
            // The added entries cannot all go in before the stale ones come out, and
            // removing first would refuse, for a moment, a destination registered before
            // and after (one that changes form, `ip:port` to `ip` at every port): refuse
            // nothing until the map is whole again.
            self.set_mode(REGISTRY_MODE_ALLOW_ANY)?;
            self.remove(&mut current, &stale)?;
        }
        for &key in &added {
            self.entries
                .insert(key, 1, 0)
                .map_err(map_error(maps::REGISTRY, "insert into"))?;
            current.insert(key);
        }
        if room {
            self.remove(&mut current, &stale)?;
        }
        self.written = Some(current);
        self.set_mode(mode)
    }

    fn remove(
        &mut self,
        current: &mut BTreeSet<RegistryKey>,
        stale: &[RegistryKey],
    ) -> Result<(), Error> {
        for key in stale {
            remove_if_present(self.entries.remove(key), maps::REGISTRY)?;
            current.remove(key);
        }
        Ok(())
    }

    /// The keys `REGISTRY` holds now.
    fn read(&self) -> Result<BTreeSet<RegistryKey>, Error> {
        self.entries
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::REGISTRY, "list"))
    }

    fn set_mode(&mut self, mode: u32) -> Result<(), Error> {
        self.mode
            .set(0, RegistryMode { mode }, 0)
            .map_err(map_error(maps::REGISTRY_MODE, "write"))
    }
}

/// The map key of a registry entry (`None`: every port).
pub(crate) fn key((ip, port): (IpAddr, Option<u16>)) -> RegistryKey {
    RegistryKey {
        addr: addr_bytes(ip.to_canonical()),
        // A port 0 entry would read as "every port": it registers more, never less.
        port: port.unwrap_or(REGISTRY_ANY_PORT),
        _pad: [0; 2],
    }
}
