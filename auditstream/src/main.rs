//! auditstream
fn main() {}
