//! The generators' integration tests, one binary (as the root crate's `tests/<group>/`):
//! golden files of every generator, the FRR config through the real `vtysh`, the
//! rendered configs run by the real programs in a namespace, and refused inputs.
//! `common` holds the example snapshot and the render environment they share.

mod common;
mod frr_vtysh;
mod golden;
mod real_children;
mod validation;
