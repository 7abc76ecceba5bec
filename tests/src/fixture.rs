//! `ClientServer`: the smallest mesh most end-to-end tests need, one node with a client and
//! a server pod and the node's agent.

use anyhow::Result;
use serde_json::Value;

use crate::{TestAgent, TestNode, TestPod};

/// One node, a client pod (service account `client`), a server pod (service account
/// `server`, labelled `app=server` for policies to select) and the node's running agent.
pub struct ClientServer {
    pub node: TestNode,
    pub client: TestPod,
    pub server: TestPod,
    pub agent: TestAgent,
}

impl ClientServer {
    /// Both pods enrolled, the node's default mesh settings.
    pub fn new(test: &str) -> Result<Self> {
        Self::with(test, None, true)
    }

    /// `mesh` replaces the node's `mesh:` section; `client_enrolled: false` leaves the client
    /// outside the mesh (a plaintext client).
    pub fn with(test: &str, mesh: Option<Value>, client_enrolled: bool) -> Result<Self> {
        let node = TestNode::new(test, 1)?;
        if let Some(mesh) = mesh {
            node.set_mesh(mesh);
        }
        let client = node
            .pod("client")
            .service_account("client")
            .enrolled(client_enrolled)
            .create()?;
        let server = node
            .pod("server")
            .service_account("server")
            .label("app", "server")
            .create()?;
        let agent = node.start_agent()?;
        Ok(Self {
            node,
            client,
            server,
            agent,
        })
    }
}
