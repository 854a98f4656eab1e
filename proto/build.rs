//! Generates `event_types.rs`: one typed constant per shipped definition file,
//! and the embedded list of definitions, so a misspelt type does not compile.

use std::{env, fmt::Write as _, fs, path::Path};

fn main() {
    let dir = Path::new("event_types");
    println!("cargo::rerun-if-changed=event_types");
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("proto/event_types exists")
        .filter_map(|e| {
            let path = e.expect("readable directory entry").path();
            (path.extension()? == "yml").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();

    let mut out = String::new();
    for name in &names {
        let konst = name.to_uppercase();
        writeln!(
            out,
            "/// The `{name}` event type (definition: `proto/event_types/{name}.yml`).\n\
             pub const {konst}: EventTypeName = EventTypeName::from_static(\"{name}\");"
        )
        .expect("write to string");
    }
    out.push_str("\n/// Every definition shipped with auditstream: (file name, YAML text).\n");
    out.push_str("pub const EMBEDDED: &[(&str, &str)] = &[\n");
    for name in &names {
        let abs = fs::canonicalize(dir.join(format!("{name}.yml"))).expect("definition path");
        writeln!(out, "    (\"{name}.yml\", include_str!({:?})),", abs).expect("write to string");
    }
    out.push_str("];\n");
    let dest = Path::new(&env::var("OUT_DIR").expect("OUT_DIR set by cargo")).join("event_types.rs");
    fs::write(dest, out).expect("write generated event types");
}
