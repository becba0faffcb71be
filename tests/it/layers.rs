//! The modules stand in floors: each imports only the modules declared before it, in the
//! order `src/lib.rs` writes them (and, for the binary, `src/main.rs`). A `crate::` import of a
//! module above is refused with the file and the name. Unit-test modules are left aside: a
//! test may reach anywhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The modules a crate root declares, in order: `pub mod x;` or `mod x;` at the start of a line.
fn declared(root: &str) -> Vec<String> {
    root.lines()
        .filter_map(|l| {
            let l = l.trim_start_matches("pub ");
            l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned)
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without comments and without its `#[cfg(test)]` modules; the names of the test
/// modules it declares in files of their own go into `test_files`.
fn code_of(text: &str, test_files: &mut Vec<String>) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "#[cfg(test)]" {
            let mut j = i + 1;
            while j < lines.len() && lines[j].trim_start().starts_with("#[") {
                j += 1;
            }
            let item = lines.get(j).map_or("", |l| l.trim());
            let item = item
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            if let Some(name) = item.strip_prefix("mod ") {
                if let Some(name) = name.strip_suffix(';') {
                    test_files.push(name.to_owned());
                    i = j + 1;
                    continue;
                }
                // Skip the module's block, braces counted.
                let mut depth = 0i64;
                let mut k = j;
                loop {
                    depth += lines[k].matches('{').count() as i64;
                    depth -= lines[k].matches('}').count() as i64;
                    k += 1;
                    if depth <= 0 || k >= lines.len() {
                        break;
                    }
                }
                i = k;
                continue;
            }
        }
        let line = lines[i];
        out.push_str(line.split("//").next().unwrap_or(""));
        out.push('\n');
        i += 1;
    }
    out
}

/// Every module named right after `crate::`, groups (`crate::{a, b::c}`) included.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut refs = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `cipherbus_crate::`, not ours
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or("");
            for part in group.split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    refs.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

/// Every import of a module above, as one sentence each, for the tree under `root`.
fn violations(root: &Path) -> Vec<String> {
    let src = root.join("src");
    let lib = declared(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let bin = std::fs::read_to_string(src.join("main.rs"))
        .map(|t| declared(&t))
        .unwrap_or_default();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut found = Vec::new();
    let mut test_files = Vec::new();
    let mut checked = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let rel_s = rel.to_string_lossy().into_owned();
        if rel_s == "lib.rs" || rel_s == "main.rs" {
            continue;
        }
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        let (order, root_file) = if lib.contains(&top) {
            (&lib, "lib.rs")
        } else if bin.contains(&top) {
            (&bin, "main.rs")
        } else {
            found.push(format!(
                "src/{rel_s} belongs to no module that src/lib.rs or src/main.rs declares"
            ));
            continue;
        };
        let mut declared_tests = Vec::new();
        let code = code_of(&std::fs::read_to_string(file).unwrap(), &mut declared_tests);
        let dir = file.parent().unwrap().to_path_buf();
        let here = if file.file_name().is_some_and(|n| n == "mod.rs") {
            dir.clone()
        } else {
            dir.join(file.file_stem().unwrap())
        };
        for name in declared_tests {
            test_files.push(here.join(format!("{name}.rs")));
            test_files.push(here.join(&name).join("mod.rs"));
            // A test module declared in a non-mod.rs file of the module's directory.
            test_files.push(dir.join(format!("{name}.rs")));
        }
        checked.push((file.clone(), rel_s, top, order, root_file, code));
    }
    for (file, rel_s, top, order, root_file, code) in checked {
        if test_files.contains(&file) {
            continue;
        }
        let floor = order.iter().position(|m| *m == top).unwrap();
        for name in crate_refs(&code) {
            if let Some(above) = order.iter().position(|m| *m == name) {
                if above > floor {
                    found.push(format!(
                        "src/{rel_s} imports crate::{name}, which stands above {top} in src/{root_file}"
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn modules_import_only_the_floors_below_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = declared(&std::fs::read_to_string(root.join("src/lib.rs")).unwrap());
    assert!(
        lib.len() >= 15 && lib.first().map(String::as_str) == Some("process"),
        "src/lib.rs declares its floors bottom to top: {lib:?}"
    );
    let found = violations(root);
    assert!(
        found.is_empty(),
        "imports of a floor above:\n{}",
        found.join("\n")
    );
}

/// The check itself can fail: an upward import in a tree made here is named, one in a unit
/// test is not, and neither is a doc comment's link.
#[test]
fn an_upward_import_is_named_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("low")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod low;\npub mod high;\n").unwrap();
    std::fs::write(src.join("high.rs"), "use crate::low::Thing;\n").unwrap();
    std::fs::write(
        src.join("low/mod.rs"),
        "//! Links to [`crate::high`] are not imports.\nmod part;\n\
         #[cfg(test)]\nmod tests {\n    use crate::high::X;\n}\n#[cfg(test)]\nmod more;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("low/part.rs"),
        "fn f() { crate::{high::Y, low}; }\n",
    )
    .unwrap();
    std::fs::write(src.join("low/more.rs"), "use crate::high::Z;\n").unwrap();
    assert_eq!(
        violations(dir.path()),
        ["src/low/part.rs imports crate::high, which stands above low in src/lib.rs"]
    );
}
