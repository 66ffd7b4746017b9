//! A pickle reader that understands only what a PyTorch state dict needs and never executes
//! anything from the file.
//!
//! Python's unpickler calls whatever callable a pickle names (`GLOBAL` + `REDUCE`), which is
//! how a malicious checkpoint runs `os.system`. This reader is a plain stack machine over
//! data values instead: a `GLOBAL` is looked up in a fixed allow-list ([`resolve_global`])
//! and anything else is refused; the few allowed callables are interpreted by this file
//! (`torch._utils._rebuild_tensor_v2` becomes a [`TensorRef`], `collections.OrderedDict` an
//! empty dict), and metadata types that Lightning checkpoints carry (callback classes,
//! numpy scalars) become inert [`Value::Object`] placeholders that are never called.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// Element type of a tensor storage (`torch.FloatStorage` and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDType {
    /// `torch.float32`
    F32,
    /// `torch.float16`
    F16,
    /// `torch.bfloat16`
    BF16,
    /// `torch.float64`
    F64,
    /// `torch.int64`
    I64,
    /// `torch.int32`
    I32,
    /// `torch.int16`
    I16,
    /// `torch.int8`
    I8,
    /// `torch.uint8`
    U8,
    /// `torch.bool`
    Bool,
}

impl StorageDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StorageDType::F64 | StorageDType::I64 => 8,
            StorageDType::F32 | StorageDType::I32 => 4,
            StorageDType::F16 | StorageDType::BF16 | StorageDType::I16 => 2,
            StorageDType::I8 | StorageDType::U8 | StorageDType::Bool => 1,
        }
    }
    /// True for floating-point types.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            StorageDType::F32 | StorageDType::F16 | StorageDType::BF16 | StorageDType::F64
        )
    }
    fn from_storage_name(name: &str) -> Option<StorageDType> {
        Some(match name {
            "FloatStorage" => StorageDType::F32,
            "HalfStorage" => StorageDType::F16,
            "BFloat16Storage" => StorageDType::BF16,
            "DoubleStorage" => StorageDType::F64,
            "LongStorage" => StorageDType::I64,
            "IntStorage" => StorageDType::I32,
            "ShortStorage" => StorageDType::I16,
            "CharStorage" => StorageDType::I8,
            "ByteStorage" => StorageDType::U8,
            "BoolStorage" => StorageDType::Bool,
            _ => return None,
        })
    }
}

/// A storage named by a persistent id: `('storage', torch.FloatStorage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// The entry `data/<key>` of the archive holding the bytes.
    pub key: String,
    /// Element type.
    pub dtype: StorageDType,
    /// Elements in the storage.
    pub numel: usize,
}

/// A tensor view of a storage (`_rebuild_tensor_v2(storage, offset, size, stride, ...)`).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// The storage the view reads.
    pub storage: StorageRef,
    /// First element of the view, in elements.
    pub offset: usize,
    /// The view's shape.
    pub shape: Vec<usize>,
    /// The view's strides, in elements.
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// Elements in the view (saturating at `usize::MAX`; [`parse`] refuses views whose
    /// element count overflows).
    pub fn numel(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }
    /// True if the view is row-major contiguous.
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect = expect.saturating_mul(d);
        }
        true
    }
    /// One past the largest storage element the view touches (0 for an empty view), or None
    /// on overflow.
    pub fn extent(&self) -> Option<usize> {
        if self.numel() == 0 {
            return Some(0);
        }
        let mut last = self.offset;
        for (&d, &s) in self.shape.iter().zip(&self.stride) {
            last = last.checked_add((d - 1).checked_mul(s)?)?;
        }
        last.checked_add(1)
    }
}

/// What an allowed global stands for. Nothing here is ever called as code; the reader
/// interprets the first few itself and keeps the rest as inert placeholders.
#[derive(Debug, Clone, PartialEq)]
pub enum Callable {
    /// `torch._utils._rebuild_tensor_v2`
    RebuildTensorV2,
    /// `torch._utils._rebuild_parameter`
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state`
    RebuildParameterWithState,
    /// `collections.OrderedDict`
    OrderedDict,
    /// `torch.Size`
    TorchSize,
    /// `torch.FloatStorage` etc. (only used inside persistent ids)
    Storage(StorageDType),
    /// A metadata type (Lightning callback class, numpy scalar, ...): calling it yields an
    /// inert [`Value::Object`].
    Inert,
}

/// An allowed global: its name and meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// Module, e.g. `torch._utils`.
    pub module: String,
    /// Name within the module.
    pub name: String,
    /// What it stands for.
    pub callable: Callable,
}

/// How many containers may sit inside one another (a list in a dict in a tuple is 3 deep).
/// A state dict is under 10 deep, and Python itself cannot pickle past its recursion limit
/// of 1000; the bound keeps every walk over a [`Value`] (its drop included) shallow, so a
/// hostile file cannot overflow the stack.
pub const MAX_NESTING: usize = 256;

/// How many values a pickle may create (pushes, memo entries). Each opcode makes at most
/// one, so this bounds the reader's memory to a constant times this count, whatever the
/// file claims; a state dict makes about fifteen per tensor.
pub const MAX_VALUES: usize = 1 << 22;

/// The most dimensions a tensor may have (PyTorch's own limit is 64).
pub const MAX_RANK: usize = 64;

/// An inert object: an allowed metadata type "called" with arguments, never executed.
#[derive(Debug, Clone)]
pub struct Object {
    /// The type.
    pub global: Global,
    /// The arguments it was given.
    pub args: Value,
    /// State set by `BUILD`, if any.
    pub state: Option<Value>,
    height: usize,
}

/// An immutable tuple and its nesting height.
#[derive(Debug, Clone)]
pub struct Tuple {
    items: Vec<Value>,
    height: usize,
}

impl std::ops::Deref for Tuple {
    type Target = [Value];
    fn deref(&self) -> &[Value] {
        &self.items
    }
}

/// A dict's entries in insertion order, with an index over its scalar keys so that filling
/// it stays linear in its size.
#[derive(Debug, Default)]
pub struct Dict {
    entries: Vec<(Value, Value)>,
    index: HashMap<Key, usize>,
}

impl Dict {
    /// The entries, in insertion order.
    pub fn entries(&self) -> &[(Value, Value)] {
        &self.entries
    }
}

/// A dict key the reader can compare: the scalar types a state dict uses. Other keys
/// (tuples, objects) are kept but never merged, which only matters for a pickle that sets
/// the same such key twice.
#[derive(Debug, Hash, PartialEq, Eq)]
enum Key {
    None,
    Int(i64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
}

impl Key {
    fn of(v: &Value) -> Option<Key> {
        Some(match v {
            Value::None => Key::None,
            // Python's True == 1 as a dict key.
            Value::Bool(b) => Key::Int(*b as i64),
            Value::Int(i) => Key::Int(*i),
            Value::Str(s) => Key::Str(s.clone()),
            Value::Bytes(b) => Key::Bytes(b.clone()),
            _ => return None,
        })
    }
}

/// A mutable container (list or dict) shared through the memo, as Python's are, with what
/// bounds nesting: its height, and whether it already sits inside another container.
///
/// Heights are kept exact without walking: a container may only grow taller while nothing
/// holds it (which is how Python's pickler writes: a container is filled before its parent
/// takes it). Growing one that is already inside another would change its ancestors'
/// heights unseen, and is also the only way to build a cycle, so it is refused.
#[derive(Debug)]
pub struct Shared<T> {
    items: RefCell<T>,
    height: Cell<usize>,
    inside: Cell<bool>,
}

impl<T: Default> Shared<T> {
    fn new() -> Rc<Shared<T>> {
        Rc::new(Shared {
            items: RefCell::default(),
            height: Cell::new(1),
            inside: Cell::new(false),
        })
    }
}

impl<T> Shared<T> {
    /// The contents.
    pub fn borrow(&self) -> std::cell::Ref<'_, T> {
        self.items.borrow()
    }

    /// Records that `child` goes into this container: marks it held and raises this
    /// container's height, refusing cycles and nesting past [`MAX_NESTING`].
    fn adopt(&self, child: &Value) -> R<()> {
        if child.shared_ptr() == Some(self as *const Self as *const ()) {
            return Err(format!("a {} is put inside itself", child.type_name()));
        }
        let h = nested_height(child.height())?;
        if h > self.height.get() {
            if self.inside.get() {
                return Err(
                    "a container that already sits inside another is made deeper afterwards \
                     (a cycle or a hand-made pickle; a state dict never does this)"
                        .into(),
                );
            }
            self.height.set(h);
        }
        child.mark_inside();
        Ok(())
    }
}

/// The height of a container holding a value of height `child`, refused past the limit.
fn nested_height(child: usize) -> R<usize> {
    let h = child + 1;
    if h > MAX_NESTING {
        return Err(format!(
            "containers nest more than {MAX_NESTING} deep (the limit MAX_NESTING); a state \
             dict is a few levels deep, so this file is corrupt or hostile"
        ));
    }
    Ok(h)
}

/// A value on the pickle stack. Lists and dicts are shared so that the memo sees later
/// mutations, as Python's does; strings and bytes are shared so that copying them (`DUP`,
/// memo gets) costs nothing, whatever their length.
#[derive(Debug, Clone)]
pub enum Value {
    /// `None`
    None,
    /// `True` / `False`
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// A text string.
    Str(Rc<str>),
    /// Bytes.
    Bytes(Rc<[u8]>),
    /// A tuple.
    Tuple(Rc<Tuple>),
    /// A list (also used for sets).
    List(Rc<Shared<Vec<Value>>>),
    /// A dict, in insertion order.
    Dict(Rc<Shared<Dict>>),
    /// A reference to an allowed global.
    Global(Rc<Global>),
    /// An inert placeholder object.
    Object(Rc<Object>),
    /// A storage persistent id.
    Storage(Rc<StorageRef>),
    /// A tensor.
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// Looks up `key` (a string) if this is a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => {
                let d = d.borrow();
                let i = *d.index.get(&Key::Str(key.into()))?;
                Some(d.entries[i].1.clone())
            }
            _ => None,
        }
    }
    /// A tuple of `items`, refused if it would nest too deep.
    fn tuple(items: Vec<Value>) -> R<Value> {
        let height = nested_height(items.iter().map(Value::height).max().unwrap_or(0))?;
        items.iter().for_each(Value::mark_inside);
        Ok(Value::Tuple(Rc::new(Tuple { items, height })))
    }
    /// Containers nested at or below this value (0 for a scalar).
    fn height(&self) -> usize {
        match self {
            Value::Tuple(t) => t.height,
            Value::List(l) => l.height.get(),
            Value::Dict(d) => d.height.get(),
            Value::Object(o) => o.height,
            _ => 0,
        }
    }
    /// The address of a mutable container, to recognise it.
    fn shared_ptr(&self) -> Option<*const ()> {
        match self {
            Value::List(l) => Some(Rc::as_ptr(l) as *const ()),
            Value::Dict(d) => Some(Rc::as_ptr(d) as *const ()),
            _ => None,
        }
    }
    fn mark_inside(&self) {
        match self {
            Value::List(l) => l.inside.set(true),
            Value::Dict(d) => d.inside.set(true),
            _ => {}
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Object(_) => "object",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Modules whose names a Lightning checkpoint may carry as plain metadata (callback classes
/// used as dict keys, their state objects, hyper-parameter containers). They are allowed as
/// inert placeholders: the reader records them and never calls them.
const INERT_MODULE_PREFIXES: &[&str] = &[
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "omegaconf.",
];

/// Exact metadata globals allowed as inert placeholders.
const INERT_GLOBALS: &[(&str, &str)] = &[
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    // numpy scalars pickled with protocol 2 spell their bytes as _codecs.encode(str, 'latin1');
    // the reader keeps the call as data and never runs it.
    ("_codecs", "encode"),
    ("argparse", "Namespace"),
    ("torch.torch_version", "TorchVersion"),
    ("typing", "Any"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
];

/// Resolves a `GLOBAL` against the allow-list, refusing everything else (`os.system`,
/// `builtins.eval`, `subprocess.Popen`, ...).
pub fn resolve_global(module: &str, name: &str) -> Result<Global, String> {
    let callable = match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Callable::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Callable::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Callable::RebuildParameterWithState,
        ("collections", "OrderedDict") => Callable::OrderedDict,
        ("torch", "Size") => Callable::TorchSize,
        ("torch", n) if StorageDType::from_storage_name(n).is_some() => {
            Callable::Storage(StorageDType::from_storage_name(n).expect("checked"))
        }
        (m, n)
            if INERT_GLOBALS.contains(&(m, n))
                || INERT_MODULE_PREFIXES.iter().any(|p| m.starts_with(p)) =>
        {
            Callable::Inert
        }
        _ => {
            return Err(format!(
                "refusing to load: the pickle names the global '{module}.{name}', which is not \
                 part of a tensor state dict (a checkpoint that names it may try to run code \
                 when loaded by Python; vqclip never executes anything from a checkpoint)"
            ))
        }
    };
    Ok(Global {
        module: module.to_string(),
        name: name.to_string(),
        callable,
    })
}

/// A pickle that could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError {
    /// Byte offset of the opcode where reading stopped.
    pub offset: usize,
    /// What went wrong.
    pub msg: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pickle byte {}: {}", self.offset, self.msg)
    }
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    /// Values made so far, against [`MAX_VALUES`].
    made: usize,
    /// Offset of the opcode being executed, for errors.
    op_start: usize,
}

type R<T> = Result<T, String>;

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated: needs {n} more bytes"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn line(&mut self) -> R<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated text argument")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "text argument is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }
    fn len(&mut self, n: u64) -> R<usize> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len() - self.pos)
            .ok_or_else(|| format!("length {n} runs past the end of the pickle"))
    }
    fn string(&mut self, n: u64) -> R<Value> {
        let n = self.len(n)?;
        let b = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(b)
                .map_err(|_| "string is not UTF-8")?
                .into(),
        ))
    }
    fn bytes(&mut self, n: u64) -> R<Value> {
        let n = self.len(n)?;
        Ok(Value::Bytes(self.take(n)?.into()))
    }
    /// Counts one more value against [`MAX_VALUES`].
    fn count(&mut self) -> R<()> {
        self.made += 1;
        if self.made > MAX_VALUES {
            return Err(format!(
                "the pickle makes more than {MAX_VALUES} values (the limit MAX_VALUES); a \
                 state dict makes about fifteen per tensor"
            ));
        }
        Ok(())
    }
    fn push(&mut self, v: Value) -> R<()> {
        self.count()?;
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> R<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("pop past a mark".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }
    fn top(&mut self) -> R<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".into())
    }
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let m = self.marks.pop().ok_or("no mark on the stack")?;
        if m > self.stack.len() {
            return Err("mark past the stack".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&self, i: u64) -> R<Value> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} is not set"))
    }
    fn memo_put(&mut self, i: u64) -> R<()> {
        let v = self.stack.last().ok_or("stack underflow")?.clone();
        self.count()?;
        self.memo.insert(i, v);
        Ok(())
    }
    fn push_global(&mut self, module: &str, name: &str) -> R<()> {
        let g = resolve_global(module, name)?;
        self.push(Value::Global(Rc::new(g)))
    }
    fn append(list: &Value, items: Vec<Value>) -> R<()> {
        match list {
            Value::List(l) => {
                for v in &items {
                    l.adopt(v)?;
                }
                l.items.borrow_mut().extend(items);
                Ok(())
            }
            v => Err(format!("APPEND to a {}", v.type_name())),
        }
    }
    fn set_items(dict: &Value, items: Vec<Value>) -> R<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of values".into());
        }
        match dict {
            Value::Dict(shared) => {
                for v in &items {
                    shared.adopt(v)?;
                }
                let mut d = shared.items.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    let key = Key::of(&k);
                    match key.as_ref().and_then(|key| d.index.get(key)) {
                        Some(&i) => d.entries[i].1 = v,
                        None => {
                            if let Some(key) = key {
                                let i = d.entries.len();
                                d.index.insert(key, i);
                            }
                            d.entries.push((k, v));
                        }
                    }
                }
                Ok(())
            }
            // An inert object's dict-like state (e.g. a Lightning callback) is data only.
            Value::Object(_) => Ok(()),
            v => Err(format!("SETITEM on a {}", v.type_name())),
        }
    }

    /// `REDUCE` / `NEWOBJ`: interprets an allowed callable; never runs code.
    fn call(&mut self, f: Value, args: Value) -> R<Value> {
        let g = match &f {
            Value::Global(g) => g.clone(),
            v => {
                return Err(format!(
                    "call of a {} (only allowed globals)",
                    v.type_name()
                ))
            }
        };
        let argv: Vec<Value> = match &args {
            Value::Tuple(t) => t.items.clone(),
            v => {
                return Err(format!(
                    "call arguments are a {}, not a tuple",
                    v.type_name()
                ))
            }
        };
        match g.callable {
            Callable::RebuildTensorV2 => rebuild_tensor(&argv).map(|t| Value::Tensor(Rc::new(t))),
            Callable::RebuildParameter | Callable::RebuildParameterWithState => {
                match argv.first() {
                    Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                    _ => Err("_rebuild_parameter without a tensor".into()),
                }
            }
            Callable::OrderedDict => {
                let d = Value::Dict(Shared::new());
                if let Some(Value::List(pairs)) = argv.first() {
                    for p in pairs.borrow().iter() {
                        match p {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                Self::set_items(&d, vec![kv[0].clone(), kv[1].clone()])?
                            }
                            _ => return Err("OrderedDict item is not a pair".into()),
                        }
                    }
                }
                Ok(d)
            }
            Callable::TorchSize => match argv.first() {
                Some(t @ Value::Tuple(_)) => Ok(t.clone()),
                _ => Err("torch.Size without a tuple".into()),
            },
            Callable::Storage(_) => Err(format!(
                "the storage type {}.{} cannot be called",
                g.module, g.name
            )),
            Callable::Inert => {
                let height = nested_height(args.height())?;
                args.mark_inside();
                Ok(Value::Object(Rc::new(Object {
                    global: g.as_ref().clone(),
                    args,
                    state: None,
                    height,
                })))
            }
        }
    }

    fn run(&mut self) -> R<Value> {
        loop {
            self.op_start = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(format!("unsupported pickle protocol {v}"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only
                    self.u64()?;
                }
                b'.' => {
                    // STOP
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => {
                    if self.marks.len() >= MAX_NESTING {
                        return Err(format!(
                            "more than {MAX_NESTING} marks are open (the limit MAX_NESTING)"
                        ));
                    }
                    self.marks.push(self.stack.len())
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes is too large"));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'I' => {
                    // INT (protocol 0), also spells booleans as 00/01
                    let s = self.line()?;
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.parse().map_err(|_| format!("bad INT '{s}'"))?),
                    };
                    self.push(v)?;
                }
                b'L' => {
                    let s = self.line()?;
                    let v = s
                        .trim_end_matches('L')
                        .parse()
                        .map_err(|_| format!("bad LONG '{s}'"))?;
                    self.push(Value::Int(v))?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8"));
                    self.push(Value::Float(v))?;
                }
                b'F' => {
                    let s = self.line()?;
                    let v = s.parse().map_err(|_| format!("bad FLOAT '{s}'"))?;
                    self.push(Value::Float(v))?;
                }
                b'X' => {
                    let n = self.u32()? as u64;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                b'T' | b'U' => {
                    // BINSTRING / SHORT_BINSTRING (Python 2 str): keep as text if it is UTF-8
                    let n = if op == b'T' {
                        self.u32()? as u64
                    } else {
                        self.u8()? as u64
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let v = match std::str::from_utf8(b) {
                        Ok(s) => Value::Str(s.into()),
                        Err(_) => Value::Bytes(b.into()),
                    };
                    self.push(v)?;
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                b')' => self.push(Value::tuple(Vec::new())?)?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::tuple(items)?)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::tuple(items)?)?;
                }
                b']' => self.push(Value::List(Shared::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    let list = Value::List(Shared::new());
                    Self::append(&list, items)?;
                    self.push(list)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let list = self.top()?.clone();
                    Self::append(&list, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?.clone();
                    Self::append(&list, items)?;
                }
                0x8f => self.push(Value::List(Shared::new()))?,
                0x90 => {
                    // ADDITEMS (sets are kept as lists)
                    let items = self.pop_mark()?;
                    let set = self.top()?.clone();
                    Self::append(&set, items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let set = Value::List(Shared::new());
                    Self::append(&set, items)?;
                    self.push(set)?;
                }
                b'}' => self.push(Value::Dict(Shared::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Shared::new());
                    Self::set_items(&d, items)?;
                    self.push(d)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?.clone();
                    Self::set_items(&d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?.clone();
                    Self::set_items(&d, items)?;
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()? as u64;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let s = self.line()?;
                    let i = s.parse().map_err(|_| format!("bad PUT '{s}'"))?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u64;
                    let v = self.memo_get(i)?;
                    self.push(v)?;
                }
                b'j' => {
                    let i = self.u32()? as u64;
                    let v = self.memo_get(i)?;
                    self.push(v)?;
                }
                b'g' => {
                    let s = self.line()?;
                    let i = s.parse().map_err(|_| format!("bad GET '{s}'"))?;
                    let v = self.memo_get(i)?;
                    self.push(v)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_global(module, name)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_str(), name.as_str()) {
                        (Some(m), Some(n)) => {
                            let (m, n) = (m.to_string(), n.to_string());
                            self.push_global(&m, &n)?
                        }
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'R' | 0x81 => {
                    // REDUCE (f, args) / NEWOBJ (cls, args)
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.push(v)?;
                }
                0x92 => {
                    // NEWOBJ_EX (cls, args, kwargs)
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.push(v)?;
                }
                b'b' => {
                    // BUILD: set state. Tensors and dicts ignore it; inert objects keep it.
                    let state = self.pop()?;
                    let top = self.top()?;
                    match top {
                        Value::Object(o) => {
                            let mut o = o.as_ref().clone();
                            o.height = o.height.max(nested_height(state.height())?);
                            state.mark_inside();
                            o.state = Some(state);
                            *top = Value::Object(Rc::new(o));
                        }
                        Value::Tensor(_) | Value::Dict(_) => {}
                        v => return Err(format!("BUILD on a {}", v.type_name())),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = persistent_storage(&pid)?;
                    self.push(Value::Storage(Rc::new(s)))?;
                }
                b'P' => return Err("text persistent ids (PERSID) are not used by torch".into()),
                b'i' | b'o' => {
                    return Err(
                        "old-style instance creation (INST/OBJ) is not part of a state dict".into(),
                    )
                }
                0x82..=0x84 => {
                    return Err("extension registry codes (EXT) are not supported".into())
                }
                0x97 | 0x98 => return Err("out-of-band buffers are not supported".into()),
                _ => return Err(format!("unknown opcode 0x{op:02x}")),
            }
        }
    }
}

fn as_usize(v: &Value, what: &str) -> R<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("{what} {i} is negative")),
        v => Err(format!("{what} is a {}, not a size", v.type_name())),
    }
}

fn as_usizes(v: &Value, what: &str) -> R<Vec<usize>> {
    match v {
        Value::Tuple(t) => t.iter().map(|x| as_usize(x, what)).collect(),
        Value::List(l) => l.borrow().iter().map(|x| as_usize(x, what)).collect(),
        v => Err(format!("{what} is a {}, not a tuple", v.type_name())),
    }
}

/// `('storage', torch.FloatStorage, '0', 'cpu', numel)` -> the storage it names.
fn persistent_storage(pid: &Value) -> R<StorageRef> {
    let t = match pid {
        Value::Tuple(t) if t.len() >= 5 => t,
        v => {
            return Err(format!(
                "persistent id is a {}, not a storage tuple",
                v.type_name()
            ))
        }
    };
    if t[0].as_str() != Some("storage") {
        return Err("persistent id does not name a storage".into());
    }
    let dtype = match &t[1] {
        Value::Global(g) => match g.callable {
            Callable::Storage(d) => d,
            _ => return Err(format!("{}.{} is not a storage type", g.module, g.name)),
        },
        v => return Err(format!("storage type is a {}", v.type_name())),
    };
    let key = t[2]
        .as_str()
        .ok_or("storage key is not a string")?
        .to_string();
    if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
        return Err(format!("storage key '{key}' is not a plain name"));
    }
    Ok(StorageRef {
        key,
        dtype,
        numel: as_usize(&t[4], "storage size")?,
    })
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, meta])`
fn rebuild_tensor(args: &[Value]) -> R<TensorRef> {
    if args.len() < 4 {
        return Err("_rebuild_tensor_v2 with fewer than 4 arguments".into());
    }
    let storage = match &args[0] {
        Value::Storage(s) => s.as_ref().clone(),
        v => return Err(format!("tensor storage is a {}", v.type_name())),
    };
    let t = TensorRef {
        storage,
        offset: as_usize(&args[1], "storage offset")?,
        shape: as_usizes(&args[2], "tensor size")?,
        stride: as_usizes(&args[3], "tensor stride")?,
    };
    if t.shape.len().max(t.stride.len()) > MAX_RANK {
        return Err(format!(
            "a tensor of rank {} (the limit MAX_RANK is {MAX_RANK})",
            t.shape.len().max(t.stride.len())
        ));
    }
    if !t.shape.contains(&0)
        && t.shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .is_none()
    {
        return Err(format!(
            "tensor size {:?} has more elements than fit in memory",
            t.shape
        ));
    }
    if t.shape.len() != t.stride.len() {
        return Err(format!(
            "tensor size {:?} and stride {:?} differ in rank",
            t.shape, t.stride
        ));
    }
    match t.extent() {
        Some(e) if e <= t.storage.numel => Ok(t),
        _ => Err(format!(
            "tensor view (offset {}, size {:?}, stride {:?}) runs past its storage of {} elements",
            t.offset, t.shape, t.stride, t.storage.numel
        )),
    }
}

/// Reads a pickle into a [`Value`]. Globals outside the allow-list are refused; nothing is
/// executed.
pub fn parse(data: &[u8]) -> Result<Value, PickleError> {
    let mut vm = Vm {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        made: 0,
        op_start: 0,
    };
    vm.run().map_err(|msg| PickleError {
        offset: vm.op_start,
        msg,
    })
}

/// The tensors of a state dict: `root["state_dict"]` if present (Lightning), else `root`;
/// entries whose value is not a tensor are skipped. Keys keep the file's order.
pub fn state_dict_tensors(root: &Value) -> Result<Vec<(String, TensorRef)>, String> {
    let sd = match root.get("state_dict") {
        Some(sd @ Value::Dict(_)) => sd,
        _ => root.clone(),
    };
    let entries = match &sd {
        Value::Dict(d) => d.borrow().entries.clone(),
        v => {
            return Err(format!(
                "the checkpoint holds a {}, not a state dict",
                v.type_name()
            ))
        }
    };
    Ok(entries
        .into_iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Some((k.to_string(), t.as_ref().clone())),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pickle bytes builder for tests.
    fn unicode(s: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend((s.len() as u32).to_le_bytes());
        v.extend(s.as_bytes());
        v
    }

    #[test]
    fn reads_plain_containers() {
        // {'a': [1, -2, 3.5, None, True], 'b': (b'xy', 'z')} in protocol 2 style
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend(unicode("a"));
        p.extend([b']', b'q', 1, b'(', b'K', 1, b'J']);
        p.extend((-2i32).to_le_bytes());
        p.push(b'G');
        p.extend(3.5f64.to_be_bytes());
        p.extend([b'N', 0x88, b'e']);
        p.extend(unicode("b"));
        p.extend([b'C', 2, b'x', b'y', 0x8c, 1, b'z', 0x86, b'u', b'.']);
        let v = parse(&p).unwrap();
        match v.get("a").unwrap() {
            Value::List(l) => assert!(matches!(
                l.borrow()[..],
                [
                    Value::Int(1),
                    Value::Int(-2),
                    Value::Float(3.5),
                    Value::None,
                    Value::Bool(true)
                ]
            )),
            v => panic!("{v:?}"),
        }
        match v.get("b").unwrap() {
            Value::Tuple(t) => match &t[..] {
                [Value::Bytes(b), Value::Str(s)] => assert_eq!((&b[..], &s[..]), (&b"xy"[..], "z")),
                t => panic!("{t:?}"),
            },
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn memo_shares_mutable_containers() {
        // d = {}; memo[0] = d; fill d after memoising; return (memo[0],) -> sees the item
        let mut p = vec![0x80, 2, b'}', b'q', 0];
        p.extend(unicode("k"));
        p.extend([b'K', 7, b's', b'0', b'h', 0, 0x85, b'.']);
        let v = parse(&p).unwrap();
        match v {
            Value::Tuple(t) => assert!(matches!(t[0].get("k"), Some(Value::Int(7)))),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn long1_is_twos_complement() {
        for (bytes, want) in [
            (vec![0x00], 0i64),
            (vec![0xff], -1),
            (vec![0xff, 0x00], 255),
            (vec![0x00, 0x80], -32768),
            (vec![1, 2, 3, 4, 5, 6, 7, 8], 0x0807060504030201),
        ] {
            let mut p = vec![0x80, 2, 0x8a, bytes.len() as u8];
            p.extend(&bytes);
            p.push(b'.');
            match parse(&p).unwrap() {
                Value::Int(got) => assert_eq!(got, want, "{bytes:?}"),
                v => panic!("{v:?}"),
            }
        }
    }

    #[test]
    fn code_executing_globals_are_refused() {
        for (m, n) in [
            ("os", "system"),
            ("posix", "system"),
            ("builtins", "eval"),
            ("builtins", "exec"),
            ("__builtin__", "eval"),
            ("subprocess", "Popen"),
            ("torch", "load"),
            ("torch._utils", "_rebuild_tensor_v3_unknown"),
        ] {
            let mut p = vec![0x80, 2, b'c'];
            p.extend(format!("{m}\n{n}\n").as_bytes());
            p.extend(unicode("echo hi"));
            p.extend([0x85, b'R', b'.']);
            let e = parse(&p).unwrap_err();
            assert!(
                e.msg.contains(&format!("'{m}.{n}'")) && e.msg.contains("refusing"),
                "{e}"
            );
        }
        // STACK_GLOBAL (protocol 4) goes through the same allow-list.
        let mut p = vec![0x80, 4, 0x8c, 8];
        p.extend(b"builtins");
        p.extend([0x8c, 4]);
        p.extend(b"eval");
        p.extend([0x93, b'.']);
        assert!(parse(&p).unwrap_err().msg.contains("'builtins.eval'"));
    }

    #[test]
    fn malformed_pickles_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x80, 2],
            vec![b'X', 0xff, 0xff, 0xff, 0x7f, b'a'],
            vec![b'h', 3, b'.'],
            vec![b'u', b'.'],
            vec![b'a', b'.'],
            vec![b'(', b'K', 1, b'K', 2, b'd', b'.'.wrapping_add(0)],
            vec![0xfe],
            vec![b'K', 1, b'K', 2, b'R', b'.'],
            vec![b'N', b'Q', b'.'],
            vec![0x8a, 20, 0, 0],
        ];
        for c in cases {
            // Must return (Ok or Err), never panic or allocate absurdly.
            let _ = parse(&c);
        }
        assert!(parse(&[b'K', 1]).unwrap_err().msg.contains("truncated"));
        assert!(parse(&[b'h', 3, b'.']).unwrap_err().msg.contains("memo"));
    }

    /// `n` empty lists, each appended into the one below: lists nested `n` deep.
    fn nested_lists(n: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        p
    }

    #[test]
    fn nesting_is_bounded_and_named() {
        // At the limit it reads; one past it, and 200,000 deep (which used to overflow the
        // stack when the value was dropped), it is refused with the limit's name.
        let ok = parse(&nested_lists(MAX_NESTING)).unwrap();
        assert_eq!(ok.height(), MAX_NESTING);
        for n in [MAX_NESTING + 1, 200_000] {
            let e = parse(&nested_lists(n)).unwrap_err();
            assert!(e.msg.contains("MAX_NESTING"), "{e}");
        }
        // The same through tuples ('(' ... 't') and through marks alone.
        let mut p = vec![b'N'];
        p.extend(std::iter::repeat_n(0x85, 100_000));
        p.push(b'.');
        assert!(parse(&p).unwrap_err().msg.contains("MAX_NESTING"));
        let mut p = std::iter::repeat_n(b'(', 100_000).collect::<Vec<_>>();
        p.push(b'.');
        assert!(parse(&p).unwrap_err().msg.contains("MAX_NESTING"));
    }

    #[test]
    fn memo_cannot_nest_past_the_limit_or_build_cycles() {
        // Memoise 300 empty lists, then put list i+1 into list i, top-down: each list is
        // already inside its parent when it grows, which would hide the growing depth.
        let n = 300u32;
        let mut p = vec![0x80, 2];
        for i in 0..n {
            p.extend([b']', b'r']);
            p.extend(i.to_le_bytes());
            p.push(b'0');
        }
        for i in 0..n - 1 {
            p.push(b'j');
            p.extend(i.to_le_bytes());
            p.push(b'j');
            p.extend((i + 1).to_le_bytes());
            p.extend([b'a', b'0']);
        }
        p.extend([b'j', 0, 0, 0, 0, b'.']);
        let e = parse(&p).unwrap_err();
        assert!(e.msg.contains("made deeper afterwards"), "{e}");

        // l = []; l.append(l)
        let e = parse(&[b']', b'q', 0, b'h', 0, b'a', b'.']).unwrap_err();
        assert!(e.msg.contains("inside itself"), "{e}");
        // a = []; b = [a]; a.append(b)
        let p = [
            b']', b'q', 0, b']', b'q', 1, b'h', 0, b'a', b'0', b'h', 0, b'h', 1, b'a', b'.',
        ];
        let e = parse(&p).unwrap_err();
        assert!(e.msg.contains("made deeper afterwards"), "{e}");

        // Sharing without cycles (one list in two places) is still fine.
        let p = [b']', b'q', 0, b'0', b'h', 0, b'h', 0, 0x86, b'.'];
        assert!(matches!(parse(&p).unwrap(), Value::Tuple(_)));
    }

    #[test]
    fn copies_are_cheap_and_values_are_counted() {
        // A 1 MB string duplicated 200,000 times would be 200 GB if copies copied.
        let mut p = vec![0x80, 4, 0x8d];
        p.extend((1u64 << 20).to_le_bytes());
        p.extend(std::iter::repeat_n(b'x', 1 << 20));
        p.extend(std::iter::repeat_n(b'2', 200_000));
        p.push(b'.');
        assert!(matches!(parse(&p).unwrap(), Value::Str(s) if s.len() == 1 << 20));
        // Every push counts, even ones popped straight away.
        let mut p = std::iter::repeat_n([b'N', b'0'], MAX_VALUES + 1)
            .flatten()
            .collect::<Vec<_>>();
        p.extend([b'N', b'.']);
        assert!(parse(&p).unwrap_err().msg.contains("MAX_VALUES"));
    }

    #[test]
    fn dicts_fill_in_linear_time_and_keep_python_key_semantics() {
        // 200,000 distinct keys in one SETITEMS: quadratic key search would take minutes.
        let n = 200_000u32;
        let mut p = vec![0x80, 2, b'}', b'('];
        for i in 0..n {
            p.push(b'J');
            p.extend(i.to_le_bytes());
            p.extend([b'K', 1]);
        }
        // A repeated key replaces the value, as in Python; True is the key 1.
        p.extend([b'K', 5, b'K', 2, 0x88, b'K', 3, b'u', b'.']);
        match parse(&p).unwrap() {
            Value::Dict(d) => {
                let d = d.borrow();
                assert_eq!(d.entries().len(), n as usize);
                assert!(matches!(d.entries()[5].1, Value::Int(2)));
                assert!(matches!(d.entries()[1].1, Value::Int(3)));
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn views_whose_element_count_overflows_are_refused() {
        let s = Value::Storage(Rc::new(StorageRef {
            key: "0".into(),
            dtype: StorageDType::F32,
            numel: 4,
        }));
        let big = Value::Int(1 << 40);
        let e = rebuild_tensor(&[
            s.clone(),
            Value::Int(0),
            Value::tuple(vec![big.clone(), big.clone()]).unwrap(),
            Value::tuple(vec![Value::Int(0), Value::Int(0)]).unwrap(),
        ])
        .unwrap_err();
        assert!(e.contains("more elements than fit"), "{e}");
        let e = rebuild_tensor(&[
            s.clone(),
            Value::Int(-1),
            Value::tuple(vec![]).unwrap(),
            Value::tuple(vec![]).unwrap(),
        ])
        .unwrap_err();
        assert!(e.contains("negative"), "{e}");
        let ones = Value::tuple(vec![Value::Int(1); MAX_RANK + 1]).unwrap();
        let e = rebuild_tensor(&[s, Value::Int(0), ones.clone(), ones]).unwrap_err();
        assert!(e.contains("MAX_RANK"), "{e}");
    }

    #[test]
    fn views_must_fit_their_storage() {
        let s = StorageRef {
            key: "0".into(),
            dtype: StorageDType::F32,
            numel: 6,
        };
        let ok = rebuild_tensor(&[
            Value::Storage(Rc::new(s.clone())),
            Value::Int(1),
            Value::tuple(vec![Value::Int(2), Value::Int(2)]).unwrap(),
            Value::tuple(vec![Value::Int(3), Value::Int(1)]).unwrap(),
        ])
        .unwrap();
        assert_eq!(ok.extent(), Some(6));
        assert!(!ok.is_contiguous());
        let bad = rebuild_tensor(&[
            Value::Storage(Rc::new(s)),
            Value::Int(2),
            Value::tuple(vec![Value::Int(2), Value::Int(2)]).unwrap(),
            Value::tuple(vec![Value::Int(3), Value::Int(1)]).unwrap(),
        ])
        .unwrap_err();
        assert!(bad.contains("runs past its storage"), "{bad}");
    }
}
