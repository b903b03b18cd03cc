//! The memory table a frontend sets (`SET_MEM_TABLE`, `ADD_MEM_REG`, `REM_MEM_REG`) and
//! its mapping.

use std::os::fd::{AsFd, OwnedFd};

use tapir_datapath::GuestMemory;
use vhost::vhost_user::message::{
    VhostUserMemory, VhostUserMemoryRegion, VhostUserSingleMemoryRegion,
};
use vm_memory::ByteValued;

use super::{invalid, RequestError, Session};
use crate::memory_table::{Region, MAX_MEM_SLOTS};
use crate::wire::Request;

impl Session {
    pub(super) fn set_mem_table(&mut self, req: &Request) -> Result<(), RequestError> {
        let head = std::mem::size_of::<VhostUserMemory>();
        let each = std::mem::size_of::<VhostUserMemoryRegion>();
        let mut hdr = VhostUserMemory::default();
        let (hb, rest) = req
            .body
            .split_at_checked(head)
            .ok_or_else(|| invalid("short SET_MEM_TABLE"))?;
        hdr.as_mut_slice().copy_from_slice(hb);
        let n = usize::try_from(hdr.num_regions).unwrap_or(usize::MAX);
        if n > MAX_MEM_SLOTS || rest.len() != n * each || req.fds.len() != n {
            return Err(invalid(format!(
                "SET_MEM_TABLE: {n} regions (at most {MAX_MEM_SLOTS}), {} body bytes, {} fds",
                req.body.len(),
                req.fds.len()
            )));
        }
        let mut regions = Vec::with_capacity(n);
        for (bytes, fd) in rest.chunks_exact(each).zip(&req.fds) {
            let mut r = VhostUserMemoryRegion::default();
            r.as_mut_slice().copy_from_slice(bytes);
            let fd = fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| RequestError::Os("dup", e))?;
            regions.push(Region {
                guest_addr: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
                fd,
            });
        }
        let memory = self.table.replace(regions)?;
        self.set_memory(memory);
        Ok(())
    }

    /// Maps the memory table anew (restarting a running device on it).
    pub fn remap(&mut self) -> Result<(), RequestError> {
        let memory = if self.table.is_empty() {
            None
        } else {
            Some(self.table.map()?)
        };
        self.set_memory(memory);
        Ok(())
    }

    /// Installs a new mapping of the memory table (restarting a running device on it).
    pub(super) fn set_memory(&mut self, memory: Option<GuestMemory>) {
        // The running device keeps its own mapping until it is restarted with the new one.
        self.flush_log();
        self.memory = memory;
        if self.running.is_some() {
            self.restart = true;
        }
    }
}

pub(super) fn region_of(r: &VhostUserSingleMemoryRegion, fd: OwnedFd) -> Region {
    Region {
        guest_addr: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
        fd,
    }
}
