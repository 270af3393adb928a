//! The CES nftables backend: the policy model rendered as one private table ([`render`]) and loaded atomically by
//! the `nft` command ([`apply`]). The meaning is docs/semantics.md; the layout is docs/nft.md.

pub mod apply;
pub mod intervals;
mod render;

pub use render::{Chain, NftSet, RenderError, Ruleset, SetKind, render};
