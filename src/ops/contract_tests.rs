//! The Rust↔WGSL contract, checked: every shader is parsed and validated by naga exactly as
//! the runtime assembles it, its uniform `Params` struct is compared member by member with
//! the Rust `#[repr(C)]` struct a dispatch uploads, and every `override` constant the Rust
//! code may set must exist in the shader with the same type.

use crate::gpu::{Contract, Override, OverrideDecl, ParamsLayout, Scalar, ShaderParams};
use naga::{AddressSpace, ScalarKind, TypeInner};

/// Every shader the engine compiles.
fn all() -> Vec<Contract> {
    use super::*;
    vec![
        attention::SHADER.contract(),
        attention_backward::SHADER.contract(),
        attention_tiled::SHADER.contract(),
        attention_tiled::SHADER_F16.contract(),
        cast::SHADER.contract(),
        concat::SHADER.contract(),
        conv2d::SHADER.contract(),
        conv2d::IM2COL.contract(),
        conv2d_igemm::SHADER.contract(),
        conv2d_igemm_tiled::SHADER.contract(),
        elementwise::SHADER.contract(),
        gather::SHADER.contract(),
        gather::SCATTER.contract(),
        group_norm::SHADER.contract(),
        layer_norm::SHADER.contract(),
        layer_norm::BACKWARD.contract(),
        matmul::SHADER.contract(),
        matmul::SUBGROUP_SHADER.contract(),
        matmul::SHADER_F16.contract(),
        matmul::SUBGROUP_SHADER_F16.contract(),
        matmul::SHADER_F16_IO.contract(),
        matmul::SUBGROUP_SHADER_F16_IO.contract(),
        matmul::COOP16_SHADER.contract(),
        matmul::COOP8_SHADER.contract(),
        layer_norm::SHADER_F16.contract(),
        attention::SHADER_F16.contract(),
        matmul_split::SHADER.contract(),
        permute::SHADER.contract(),
        reduce::SHADER.contract(),
        softmax::SHADER.contract(),
        upsample::SHADER.contract(),
        vq::SHADER.contract(),
        warp::SHADER.contract(),
        crate::optim::SHADER.contract(),
        crate::bench::peak::SHADER.contract(),
        crate::bench::peak::F16_SHADER.contract(),
    ]
}

/// One member of the shader's uniform struct, as naga lays it out.
#[derive(Debug)]
struct Member {
    name: String,
    offset: usize,
    size: usize,
    scalar: Option<Scalar>,
}

fn scalar_of(module: &naga::Module, inner: &TypeInner) -> Option<Scalar> {
    let s = match inner {
        TypeInner::Scalar(s) | TypeInner::Vector { scalar: s, .. } => *s,
        TypeInner::Array { base, .. } => return scalar_of(module, &module.types[*base].inner),
        _ => return None,
    };
    match (s.kind, s.width) {
        (ScalarKind::Uint, 4) => Some(Scalar::U32),
        (ScalarKind::Sint, 4) => Some(Scalar::I32),
        (ScalarKind::Float, 4) => Some(Scalar::F32),
        (ScalarKind::Bool, _) => Some(Scalar::Bool),
        _ => None,
    }
}

/// Parses and validates `source`, or says why it cannot.
fn parse(source: &str) -> Result<naga::Module, String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string(source))?;
    Ok(module)
}

/// The members and size of the struct bound as a uniform at `@group(0) @binding(0)`, where
/// [`crate::Gpu::dispatch`] puts the params.
fn uniform_params(module: &naga::Module) -> Result<(Vec<Member>, usize), String> {
    let mut uniforms = module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == AddressSpace::Uniform);
    let (_, g) = uniforms.next().ok_or("no uniform variable")?;
    if uniforms.next().is_some() {
        return Err("more than one uniform variable".into());
    }
    match &g.binding {
        Some(b) if b.group == 0 && b.binding == 0 => {}
        b => {
            return Err(format!(
                "the uniform is bound at {b:?}, not @group(0) @binding(0)"
            ))
        }
    }
    let TypeInner::Struct { members, span } = &module.types[g.ty].inner else {
        return Err("the uniform is not a struct".into());
    };
    let members = members
        .iter()
        .map(|m| {
            let inner = &module.types[m.ty].inner;
            Member {
                name: m.name.clone().unwrap_or_default(),
                offset: m.offset as usize,
                size: inner.size(module.to_ctx()) as usize,
                scalar: scalar_of(module, inner),
            }
        })
        .collect();
    Ok((members, *span as usize))
}

/// Compares a Rust params layout with the WGSL struct's members. A Rust field matches the
/// WGSL member at its offset with the same name, size and scalar type; a Rust array field
/// may instead match consecutive scalar members whose names start with its own (`_pad:
/// [u32; 3]` ↔ `_pad0, _pad1, _pad2`), because WGSL uniform arrays need a 16-byte stride.
fn compare_params(rust: &ParamsLayout, wgsl: &[Member], wgsl_size: usize) -> Vec<String> {
    let mut errs = Vec::new();
    if rust.size != wgsl_size {
        errs.push(format!(
            "{} is {} bytes, the WGSL struct {wgsl_size}",
            rust.name, rust.size
        ));
    }
    let mut at = 0;
    for f in rust.fields {
        if f.offset != at {
            errs.push(format!(
                "{}.{} starts at byte {}, after a gap from byte {at}",
                rust.name, f.name, f.offset
            ));
        }
        at = f.offset + f.size;
    }
    let mut j = 0;
    for f in rust.fields {
        let Some(m) = wgsl.get(j) else {
            errs.push(format!(
                "{}.{} (byte {}) has no WGSL member",
                rust.name, f.name, f.offset
            ));
            continue;
        };
        if m.offset != f.offset {
            errs.push(format!(
                "{}.{} is at byte {}, the WGSL member there ({}) at byte {}",
                rust.name, f.name, f.offset, m.name, m.offset
            ));
            return errs;
        }
        if m.name == f.name {
            if m.size != f.size || m.scalar != Some(f.scalar) {
                errs.push(format!(
                    "{}.{} is {} bytes of {:?}, the WGSL member {} bytes of {:?}",
                    rust.name, f.name, f.size, f.scalar, m.size, m.scalar
                ));
            }
            j += 1;
            continue;
        }
        // An array split into scalars on the WGSL side.
        let end = f.offset + f.size;
        let mut covered = f.offset;
        while let Some(m) = wgsl.get(j).filter(|m| m.offset < end) {
            if f.size == 4
                || !m.name.starts_with(f.name)
                || m.offset != covered
                || m.size != 4
                || m.scalar != Some(f.scalar)
            {
                errs.push(format!(
                    "{}.{} ({} bytes of {:?} at byte {}) does not match the WGSL member {} \
                     ({} bytes of {:?} at byte {})",
                    rust.name,
                    f.name,
                    f.size,
                    f.scalar,
                    f.offset,
                    m.name,
                    m.size,
                    m.scalar,
                    m.offset
                ));
                return errs;
            }
            covered += 4;
            j += 1;
        }
        if covered != end {
            errs.push(format!(
                "{}.{} ends at byte {end}, its WGSL members at byte {covered}",
                rust.name, f.name
            ));
        }
    }
    for m in &wgsl[j.min(wgsl.len())..] {
        errs.push(format!(
            "WGSL member {} (byte {}) has no Rust field in {}",
            m.name, m.offset, rust.name
        ));
    }
    errs
}

/// Everything wrong with one shader's contract, each line naming the file; empty when it
/// holds.
fn check(c: &Contract) -> Vec<String> {
    check_module(c)
        .into_iter()
        .map(|e| match c.name == c.file {
            true => format!("shaders/{}.wgsl: {e}", c.file),
            // A twin module of the file (other libraries): its name too.
            false => format!("shaders/{}.wgsl as {}: {e}", c.file, c.name),
        })
        .collect()
}

fn check_module(c: &Contract) -> Vec<String> {
    let module = match parse(c.source) {
        Ok(m) => m,
        Err(e) => return vec![e],
    };
    let mut errs = match uniform_params(&module) {
        Ok((members, size)) => compare_params(&c.params, &members, size),
        Err(e) => vec![e],
    };
    for o in c.overrides {
        let found = module
            .overrides
            .iter()
            .find(|(_, w)| w.name.as_deref() == Some(o.name));
        match found {
            None => errs.push(format!("override {} is not declared", o.name)),
            Some((_, w)) => {
                let ty = scalar_of(&module, &module.types[w.ty].inner);
                if ty != Some(o.ty) {
                    errs.push(format!(
                        "override {} is {:?} in WGSL, set from {:?}",
                        o.name, ty, o.ty
                    ));
                }
            }
        }
    }
    errs
}

#[test]
fn every_shader_matches_its_rust_params_and_overrides() {
    let all = all();
    let errs: Vec<String> = all.iter().flat_map(check).collect();
    assert!(errs.is_empty(), "{}", errs.join("\n"));
    // Every shader file is in the list (a new one must be added to `all`).
    let mut files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".wgsl").map(str::to_string)
        })
        .collect();
    files.sort();
    // Twins of one file (f16 B operand) list it once.
    let mut listed: Vec<String> = all.iter().map(|c| c.file.to_string()).collect();
    listed.sort();
    listed.dedup();
    assert_eq!(files, listed);
}

// The checker must be able to fail: the same shader against Rust declarations that are wrong
// in each way the test is meant to catch.

crate::shader_params! {
    /// `reduce`'s params with two fields swapped.
    pub(crate) struct Reordered { a: u32, outer: u32, inner: u32, parts: u32, scale: f32, _pad: [u32; 3] }
}
crate::shader_params! {
    /// `reduce`'s params with a field renamed.
    pub(crate) struct Renamed { outer: u32, a: u32, inner: u32, parts: u32, factor: f32, _pad: [u32; 3] }
}
crate::shader_params! {
    /// `reduce`'s params with a field grown and the padding shrunk to keep the size.
    pub(crate) struct Resized { outer: u32, a: u32, inner: u32, parts: u32, scale: [f32; 2], _pad: [u32; 2] }
}
crate::shader_params! {
    /// `reduce`'s params with a float where WGSL has a `u32`.
    pub(crate) struct Retyped { outer: u32, a: u32, inner: f32, parts: u32, scale: f32, _pad: [u32; 3] }
}
crate::shader_params! {
    /// `reduce`'s params without the trailing padding.
    pub(crate) struct Short { outer: u32, a: u32, inner: u32, parts: u32, scale: f32 }
}

fn reduce_with(params: ParamsLayout) -> Vec<String> {
    check(&Contract {
        params,
        ..super::reduce::SHADER.contract()
    })
}

#[test]
fn the_checker_reports_reordered_renamed_resized_and_retyped_fields() {
    assert!(reduce_with(super::reduce::SHADER.contract().params).is_empty());
    for (layout, needle) in [
        (Reordered::LAYOUT, "Reordered.a"),
        (Renamed::LAYOUT, "Renamed.factor"),
        (Resized::LAYOUT, "Resized.scale"),
        (Retyped::LAYOUT, "Retyped.inner"),
        (Short::LAYOUT, "Short is 20 bytes, the WGSL struct 32"),
    ] {
        let errs = reduce_with(layout);
        assert!(
            errs.iter().any(|e| e.contains(needle)),
            "{needle}: {errs:?}"
        );
    }
}

#[test]
fn the_checker_reports_missing_and_mistyped_overrides() {
    let base = super::reduce::SHADER.contract();
    const TYPO: &[OverrideDecl] = &[Override::<u32>::new("WGG").decl()];
    let errs = check(&Contract {
        overrides: TYPO,
        ..base
    });
    assert_eq!(
        errs,
        ["shaders/reduce.wgsl: override WGG is not declared".to_string()]
    );
    const WRONG_TYPE: &[OverrideDecl] = &[Override::<bool>::new("WG").decl()];
    let errs = check(&Contract {
        overrides: WRONG_TYPE,
        ..base
    });
    assert_eq!(
        errs,
        ["shaders/reduce.wgsl: override WG is Some(U32) in WGSL, set from Bool".to_string()]
    );
}

#[test]
fn the_checker_reports_a_shader_naga_rejects() {
    let errs = check(&Contract {
        source: "fn f() -> u32 { return 1.5; }",
        ..super::reduce::SHADER.contract()
    });
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("shaders/reduce.wgsl: error: automatic conversions"),
        "{errs:?}"
    );
}
