//! Connection limits: how many connections a hub holds at once, globally and per
//! workspace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The hub's connection limits and their current counts.
#[derive(Debug)]
pub(crate) struct Admission {
    global: Option<Arc<Semaphore>>,
    per_workspace: Option<usize>,
    workspaces: Mutex<HashMap<String, usize>>,
}

/// A connection's place within the limits; dropping it (when the connection is gone)
/// gives the place back.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    _global: Option<OwnedSemaphorePermit>,
    workspace: Option<(Arc<Admission>, String)>,
}

impl Admission {
    pub(crate) fn new(max: Option<usize>, per_workspace: Option<usize>) -> Arc<Self> {
        Arc::new(Admission {
            global: max.map(|n| Arc::new(Semaphore::new(n))),
            per_workspace,
            workspaces: Mutex::new(HashMap::new()),
        })
    }

    /// A place among all connections, or `None` when the hub is full.
    pub(crate) fn admit(&self) -> Option<Admitted> {
        let global = match &self.global {
            Some(semaphore) => Some(semaphore.clone().try_acquire_owned().ok()?),
            None => None,
        };
        Some(Admitted {
            _global: global,
            workspace: None,
        })
    }

    /// Adds a place within `workspace` to `admitted`; false when the workspace is full.
    pub(crate) fn admit_workspace(
        self: &Arc<Self>,
        admitted: &mut Admitted,
        workspace: &str,
    ) -> bool {
        let Some(max) = self.per_workspace else {
            return true;
        };
        let mut counts = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(workspace.to_owned()).or_insert(0);
        if *count >= max {
            if *count == 0 {
                counts.remove(workspace);
            }
            return false;
        }
        *count += 1;
        admitted.workspace = Some((self.clone(), workspace.to_owned()));
        true
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((admission, workspace)) = self.workspace.take() {
            let mut counts = admission
                .workspaces
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(count) = counts.get_mut(&workspace) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&workspace);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_and_given_back() {
        let admission = Admission::new(Some(2), Some(1));
        let mut a = admission.admit().expect("room");
        let mut b = admission.admit().expect("room");
        assert!(admission.admit().is_none(), "global limit");
        assert!(admission.admit_workspace(&mut a, "ws1"));
        assert!(
            !admission.admit_workspace(&mut b, "ws1"),
            "per-workspace limit"
        );
        assert!(admission.admit_workspace(&mut b, "ws2"));
        drop(a);
        let mut c = admission.admit().expect("a place was given back");
        assert!(
            admission.admit_workspace(&mut c, "ws1"),
            "and its workspace place"
        );
        drop((b, c));
        assert!(
            admission.workspaces.lock().unwrap().is_empty(),
            "no counts left behind"
        );
    }
}
