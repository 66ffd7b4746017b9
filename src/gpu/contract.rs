//! The Rust side of the Rust↔WGSL contract: each kernel's params struct and `override`
//! constants are declared once here in Rust, the runtime sets them through these
//! declarations, and `ops::contract_tests` checks every declaration against the parsed
//! shader (naga), so a renamed, reordered or resized field or a misspelt override fails a
//! test instead of aborting the process at pipeline creation.

use std::marker::PhantomData;

/// The scalar type behind a params field or an `override` constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    /// `u32`.
    U32,
    /// `i32`.
    I32,
    /// `f32`.
    F32,
    /// `bool` (override constants only: WGSL uniforms cannot hold bools).
    Bool,
}

/// A Rust type that a params field may have: a 4-byte scalar or an array of them.
pub trait WgslField {
    /// The scalar type of the field (of its elements, for an array).
    const SCALAR: Scalar;
}
impl WgslField for u32 {
    const SCALAR: Scalar = Scalar::U32;
}
impl WgslField for i32 {
    const SCALAR: Scalar = Scalar::I32;
}
impl WgslField for f32 {
    const SCALAR: Scalar = Scalar::F32;
}
impl<T: WgslField, const N: usize> WgslField for [T; N] {
    const SCALAR: Scalar = T::SCALAR;
}

/// One field of a params struct as Rust lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// The field's name; the WGSL member must have the same name, or, for an array field
    /// split into scalars on the WGSL side, names that start with it (`_pad` ↔ `_pad0`,
    /// `_pad1`, ...).
    pub name: &'static str,
    /// Byte offset (`offset_of!`).
    pub offset: usize,
    /// Byte size (`size_of`).
    pub size: usize,
    /// Scalar type of the field or of its elements.
    pub scalar: Scalar,
}

/// The layout of a `#[repr(C)]` params struct, written by [`shader_params!`](crate::shader_params).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamsLayout {
    /// The Rust type's name (for messages).
    pub name: &'static str,
    /// `size_of` the struct.
    pub size: usize,
    /// Every field, in declaration order.
    pub fields: &'static [Field],
}

/// A params struct uploaded to `@binding(0)` of a kernel: plain bytes with a known layout.
pub trait ShaderParams: bytemuck::Pod {
    /// The struct's layout, checked against the shader's uniform struct by the contract test.
    const LAYOUT: ParamsLayout;
}

/// Defines a `#[repr(C)]` params struct together with its [`ShaderParams`] layout, so the
/// layout the contract test checks is the struct the runtime uploads. Fields are 4-byte
/// scalars (`u32`, `i32`, `f32`) or arrays of them.
#[macro_export]
macro_rules! shader_params {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name { $($(#[$fmeta])* $field: $ty),* }

        impl $crate::gpu::ShaderParams for $name {
            const LAYOUT: $crate::gpu::ParamsLayout = $crate::gpu::ParamsLayout {
                name: stringify!($name),
                size: ::std::mem::size_of::<$name>(),
                fields: &[$($crate::gpu::Field {
                    name: stringify!($field),
                    offset: ::std::mem::offset_of!($name, $field),
                    size: ::std::mem::size_of::<$ty>(),
                    scalar: <$ty as $crate::gpu::WgslField>::SCALAR,
                }),*],
            };
        }
    };
}

/// A Rust type an `override` constant may be set from.
pub trait OverrideValue: Copy + Into<f64> {
    /// The WGSL type the constant must have.
    const SCALAR: Scalar;
}
impl OverrideValue for bool {
    const SCALAR: Scalar = Scalar::Bool;
}
impl OverrideValue for u32 {
    const SCALAR: Scalar = Scalar::U32;
}
impl OverrideValue for i32 {
    const SCALAR: Scalar = Scalar::I32;
}
impl OverrideValue for f32 {
    const SCALAR: Scalar = Scalar::F32;
}

/// An `override` constant of a shader, typed by the Rust value it is set from. Declare it as
/// a `const` next to the shader and list it in the shader's [`shader!`](crate::shader) call.
pub struct Override<T> {
    /// The WGSL name.
    pub name: &'static str,
    _value: PhantomData<fn(T)>,
}

impl<T> Clone for Override<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Override<T> {}

impl<T: OverrideValue> Override<T> {
    /// The constant `name`.
    pub const fn new(name: &'static str) -> Self {
        Override {
            name,
            _value: PhantomData,
        }
    }
    /// The name and type, as listed in a [`Shader`](super::Shader).
    pub const fn decl(self) -> OverrideDecl {
        OverrideDecl {
            name: self.name,
            ty: T::SCALAR,
        }
    }
}

/// An `override` constant the runtime may set on a shader: its name and WGSL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverrideDecl {
    /// The WGSL name.
    pub name: &'static str,
    /// The WGSL type.
    pub ty: Scalar,
}

/// Everything the contract test needs about one shader, without its params type parameter.
#[derive(Debug, Clone, Copy)]
pub struct Contract {
    /// The shader's name ([`super::Shader::name`]).
    pub name: &'static str,
    /// Its main file, `shaders/<file>.wgsl`.
    pub file: &'static str,
    /// The assembled source, `shaders/lib/` prefixes included, exactly as compiled.
    pub source: &'static str,
    /// The Rust params struct uploaded to `@binding(0)`.
    pub params: ParamsLayout,
    /// The override constants the runtime may set.
    pub overrides: &'static [OverrideDecl],
}
