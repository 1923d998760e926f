//! The status page and its JSON API on the HTTP port (`page`), and the miss explanations
//! they offer (`explain`), drawn from the server's history (`activity`), its scheduler and
//! its CAS.

pub mod explain;
pub mod page;
