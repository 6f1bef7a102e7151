//! Which closure struct type each closure function uses, read from the code that builds the
//! closures: an escaping closure is allocated with its compiler-generated struct type as the
//! allocator's type argument (`LEAQ type(IP), AX` / `CALL runtime.newobject` on Go 1.19;
//! `LEAQ type(IP), BX` / `CALL runtime.mallocgc…` on later releases), then the closure's code
//! pointer is stored into word 0 of the new object (`LEAQ fn(SB), CX` / `MOVQ CX, (AX)`). The
//! same holds for the wrappers the compiler makes for `defer f.Close()` and method values.
//!
//! A linear scan per function: registers holding a RIP-relative address (`LEA`) are followed,
//! the object returned by an allocator call is followed through register copies, and a store
//! of a function's entry into word 0 of that object ties the function to the type.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
};

use super::{
    GoBinary,
    gotypes::{GoType, TypeKind, TypeReader},
};
use crate::arch::GoRegister;

/// What a closure function's closure object holds, from its struct type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosureLayout {
    /// The closure function (ELF virtual address).
    pub code: u64,
    /// The closure struct type, as the binary names it.
    pub type_name: String,
    /// Bytes of the closure object.
    pub size: u64,
    /// The captured variables, in field order (the code pointer, field 0, left out).
    pub captures: Vec<CapturedField>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedField {
    /// The variable's name where the release keeps it (`m`, `.autotmp_3`), else the
    /// positional `X0`, `X1`, ….
    pub name: String,
    pub offset: u64,
    pub typ: GoType,
}

/// Closure layouts of one binary: those built in the functions with heap defer sites, found
/// at once ([`GoBinary::closure_types`]), and others by scanning the function that a closure's
/// name says encloses it (`main.f.func1` → `main.f`), on first use; and the defer sites of the
/// range-over-func loop bodies, whose records don't carry one.
pub struct ClosureTypes<'b> {
    pub(super) binary: &'b GoBinary,
    pub(super) types: TypeReader<'b>,
    pub(super) callees: Callees,
    /// Closure code → closure struct type address.
    pub(super) by_code: Mutex<HashMap<u64, u64>>,
    /// Functions already scanned.
    pub(super) scanned: Mutex<HashSet<u64>>,
    /// Layouts decoded so far, by closure code.
    pub(super) layouts: Mutex<HashMap<u64, Option<Arc<ClosureLayout>>>>,
    /// Range-over-func loop bodies with exactly one `deferprocat` call: body function name →
    /// the call's return address.
    pub(super) range_sites: BTreeMap<String, u64>,
    /// Return address of each scanned defer call → the closure it passes.
    pub(super) deferred: Mutex<HashMap<u64, Deferred>>,
}

/// The closure a heap defer site passes, from the code around it ([`ClosureTypes::deferred_at`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeferredClosure {
    /// The closure's code (ELF virtual address).
    pub code: u64,
    /// What it captures; None for a static funcval, which captures nothing.
    pub layout: Option<Arc<ClosureLayout>>,
}

/// A lock that a panic elsewhere does not poison (the maps stay consistent: every update is
/// one insert).
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The range-over-func bodies of `sites` with one `deferprocat` call each.
pub(super) fn range_sites(sites: &[super::DeferSite]) -> BTreeMap<String, u64> {
    let mut by_body: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for site in sites.iter().filter(|site| site.callee == "runtime.deferprocat") {
        by_body.entry(site.location.function.clone()).or_default().push(site.return_address);
    }
    by_body
        .into_iter()
        .filter(|(_, pcs)| pcs.len() == 1)
        .map(|(body, pcs)| (body, pcs[0]))
        .collect()
}

impl ClosureTypes<'_> {
    pub fn types(&self) -> &TypeReader<'_> {
        &self.types
    }

    /// The executable's image ([`GoBinary::image_range`]): where static funcvals live.
    pub fn image_range(&self) -> (u64, u64) {
        self.binary.image_range()
    }

    /// Scans the function at `address` for closures it builds.
    pub(super) fn scan(&self, address: u64) {
        if !locked(&self.scanned).insert(address) {
            return;
        }
        let Some(function) = self.binary.function_at(address) else { return };
        let Ok(code) = self.binary.function_code(&function) else { return };
        let is_function = |a: u64| self.binary.function_at(a).is_some_and(|f| f.address == a);
        let found = self.binary.isa().closures_built(
            code,
            function.address,
            &self.callees,
            &|a| self.types.is_type_address(a),
            &is_function,
        );
        let mut by_code = locked(&self.by_code);
        for (code, typ) in found.types {
            by_code.entry(code).or_insert(typ);
        }
        locked(&self.deferred).extend(found.deferred);
    }

    /// The closure the heap defer whose `deferproc`/`deferprocat` call returns to
    /// `return_address` passes, when the code building it was found: a closure object whose
    /// layout is known, or a static funcval. None when it can't be told from the code (the
    /// closure comes from elsewhere, e.g. a func value parameter).
    pub fn deferred_at(&self, return_address: u64) -> Option<DeferredClosure> {
        let deferred = locked(&self.deferred).get(&return_address).copied()?;
        match deferred {
            Deferred::Code(code) => {
                Some(DeferredClosure { code, layout: Some(self.layout(code)?) })
            }
            Deferred::Funcval(funcval) => {
                let (start, end) = self.binary.image_range();
                let code =
                    self.binary.read_u64(funcval).filter(|_| (start..end).contains(&funcval))?;
                let entry = self.binary.function_at(code).is_some_and(|f| f.address == code);
                entry.then_some(DeferredClosure { code, layout: None })
            }
        }
    }

    /// The layout of the closure whose code is at `code` (ELF virtual address). None when no
    /// code building it was found (it may capture nothing: then it is a static funcval).
    /// Decoded once per closure function.
    pub fn layout(&self, code: u64) -> Option<Arc<ClosureLayout>> {
        if let Some(layout) = locked(&self.layouts).get(&code) {
            return layout.clone();
        }
        let layout = self.decode_layout(code).map(Arc::new);
        locked(&self.layouts).insert(code, layout.clone());
        layout
    }

    /// The defer site (return address of the `deferprocat` call, ELF virtual address) of a
    /// range-over-func body's record, from its closure's code: the loop body is the function
    /// enclosing the closure (`main.f-range1.1` → `main.f-range1`, Go 1.27), or the only body of
    /// the function enclosing it (`main.f.func1` or `main.f.deferwrap2` → `main.f-range1`, Go
    /// 1.22–1.26).
    pub fn range_site(&self, code: u64) -> Option<u64> {
        let function = self.binary.function_at(code)?;
        enclosing_functions(&function.name).into_iter().find_map(|parent| {
            if let Some(pc) = self.range_sites.get(&parent) {
                return Some(*pc);
            }
            let prefix = format!("{parent}-range");
            let mut bodies = self.range_sites.range(prefix.clone()..).take_while(|(body, _)| {
                body.starts_with(&prefix) && !body[prefix.len()..].contains(['.', '-'])
            });
            match (bodies.next(), bodies.next()) {
                (Some((_, pc)), None) => Some(*pc),
                _ => None,
            }
        })
    }

    fn decode_layout(&self, code: u64) -> Option<ClosureLayout> {
        let known = |code| locked(&self.by_code).get(&code).copied();
        let typ = match known(code) {
            Some(typ) => typ,
            None => {
                let function = self.binary.function_at(code).filter(|f| f.address == code)?;
                for parent in enclosing_functions(&function.name) {
                    if let Some(parent) = self.binary.function(&parent) {
                        self.scan(parent.address);
                    }
                }
                known(code)?
            }
        };
        let closure = self.types.get(typ).filter(|t| t.kind == TypeKind::Struct)?;
        let captures = closure
            .fields
            .iter()
            .filter(|field| field.offset > 0)
            .map(|field| {
                Some(CapturedField {
                    name: field.name.clone(),
                    offset: field.offset,
                    typ: self.types.get(field.typ)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(ClosureLayout { code, type_name: closure.name, size: closure.size, captures })
    }
}

/// The functions that may build the closure `name`, innermost first: `main.f.func1.2` →
/// `main.f.func1`, `main.f`; `main.f-range1.1` → `main.f-range1`, `main.f`;
/// `main.f.deferwrap1` → `main.f`.
fn enclosing_functions(name: &str) -> Vec<String> {
    let mut parents = Vec::new();
    let mut rest = name;
    while let Some(cut) = rest.rfind(['.', '-']) {
        let parent = &rest[..cut];
        // A package path alone (`main`, `example.com/x/y`) or a receiver type is no function.
        let last = parent.rsplit('/').next().unwrap_or(parent);
        if !last.contains('.') || parent.ends_with(')') {
            break;
        }
        parents.push(parent.to_owned());
        rest = parent;
    }
    parents
}

/// The allocator a closure object is built with, and the register of its type argument.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Allocator {
    pub address: u64,
    pub type_register: GoRegister,
}

/// The closure a `defer` passes to `runtime.deferproc` / `deferprocat` (in RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deferred {
    /// A closure object built just before, whose code is at this address.
    Code(u64),
    /// A static funcval (a closure that captures nothing) at this address.
    Funcval(u64),
}

impl Deferred {
    /// What a defer call passes in its closure register: the object just built (when its
    /// code pointer was stored into it), else a static funcval's address, else unknown.
    pub(crate) fn passed(
        object: bool,
        object_code: Option<u64>,
        address: Option<u64>,
    ) -> Option<Deferred> {
        match (object, object_code, address) {
            (true, Some(code), _) => Some(Deferred::Code(code)),
            (false, _, Some(funcval)) => Some(Deferred::Funcval(funcval)),
            _ => None,
        }
    }
}

/// What one function's code says about its closures.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Built {
    /// Closure code address → closure type descriptor address.
    pub types: HashMap<u64, u64>,
    /// Return address of each `CALL` to a defer function → the closure it passes.
    pub deferred: HashMap<u64, Deferred>,
}

/// The runtime functions a closure-building scan tells apart.
#[derive(Clone, Debug, Default)]
pub(crate) struct Callees {
    pub allocators: Vec<Allocator>,
    /// `runtime.deferproc`, `runtime.deferprocat`.
    pub defer_functions: Vec<u64>,
    /// `runtime.gcWriteBarrier*`: they keep every general register but one (R11 on amd64, R25
    /// on arm64), so a call to one (on the write barrier's slow path, between building a closure
    /// and deferring it) ends nothing the scan follows.
    pub write_barriers: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enclosing_functions_by_name() {
        assert_eq!(enclosing_functions("main.f.func1"), ["main.f"]);
        assert_eq!(enclosing_functions("main.f.func1.2"), ["main.f.func1", "main.f"]);
        assert_eq!(enclosing_functions("main.f-range1.1"), ["main.f-range1", "main.f"]);
        assert_eq!(enclosing_functions("main.f.deferwrap1"), ["main.f"]);
        assert_eq!(enclosing_functions("example.com/x/y.(*T).m.func1"), ["example.com/x/y.(*T).m"]);
    }
}
