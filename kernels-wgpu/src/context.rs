//! The GPU context: adapter choice, device features and limits, the pipeline cache and the
//! scratch-buffer pool, and the batch every op records its dispatches into.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use kernels_core::{Error, Result};
use kernels_wgsl::{Family, ModuleSpec, Target};

/// How the context picks an adapter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The best adapter: a discrete GPU before an integrated one before a software one, Vulkan,
    /// Metal or DX12 before GL. On native the environment variable `KERNELS_WGPU_ADAPTER`, when
    /// set, overrides this with [`AdapterChoice::NameContains`].
    #[default]
    Auto,
    /// The first adapter whose name contains this text (case-insensitive), e.g. `"llvmpipe"`.
    NameContains(String),
}

/// Whether the context uses an optional adapter feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FeatureUse {
    /// Use it where the adapter offers it.
    #[default]
    Auto,
    /// Never use it: the portable kernels run (tests force each variant this way).
    Off,
    /// Use it, and fail to create the context where the adapter lacks it.
    Required,
}

/// How to create a [`Context`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextOptions {
    /// Backends to look at. Default: all.
    pub backends: wgpu::Backends,
    /// Adapter choice. Default: [`AdapterChoice::Auto`].
    pub adapter: AdapterChoice,
    /// `shader-f16` (f16 weights read as `array<f16>`). Default: auto.
    pub shader_f16: FeatureUse,
    /// Subgroup operations (ballots in the sparse-input sweep). Default: auto.
    pub subgroups: FeatureUse,
    /// Caps the bytes a matrix page (one storage binding) may hold, below the device's limit;
    /// matrices larger than a page are split into pages of whole rows. Default: the device
    /// limit. Vectors (`[len, 1]`) always page at the device limit, since GEMV binds them whole.
    /// Tests use a small cap to exercise paging on small tensors.
    pub max_page_bytes: Option<u64>,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            backends: wgpu::Backends::all(),
            adapter: AdapterChoice::Auto,
            shader_f16: FeatureUse::Auto,
            subgroups: FeatureUse::Auto,
            max_page_bytes: None,
        }
    }
}

/// The optional features a context uses (each one selects kernel variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GpuFeatures {
    /// f16 weights are bound as `array<f16>`.
    pub shader_f16: bool,
    /// Subgroup kernels run.
    pub subgroups: bool,
}

const HEALTHY: u8 = 0;
const OUT_OF_MEMORY: u8 = 1;
const REJECTED: u8 = 2;
const LOST: u8 = 3;

/// One binding of a kernel's bind group, by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Slot {
    Read,
    ReadWrite,
    Uniform,
}

/// A kernel: its module, entry point and bind group layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Kernel {
    pub family: Family,
    pub entry: &'static str,
    pub slots: &'static [Slot],
    pub needs_subgroups: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    module: ModuleSpec,
    entry: &'static str,
    constants: Vec<(&'static str, u32)>,
}

pub(crate) struct Pipeline {
    compute: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    slots: &'static [Slot],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    bytes: u64,
    usage: wgpu::BufferUsages,
}

/// The GPU a set of tensors lives on, with its caches.
///
/// Created once ([`Context::new`]); pipelines are compiled on first use and cached by kernel,
/// variant and override constants; scratch buffers (partial sums, parameters, downloads) are
/// pooled by size class and reused.
///
/// ```
/// use kernels_wgpu::prelude::*;
/// let options = ContextOptions { subgroups: FeatureUse::Off, ..ContextOptions::default() };
/// let ctx = Context::new_blocking(options)?;
/// println!("{} on {:?}", ctx.adapter_info().name, ctx.adapter_info().backend);
/// assert!(!ctx.features().subgroups);
/// // A page is at most one storage binding, and at most the device's buffer size.
/// assert!(ctx.page_bytes() <= ctx.binding_bytes());
/// assert!(ctx.binding_bytes() <= ctx.limits().max_buffer_size);
///
/// let x = GpuTensor::from_slice(&ctx, &[1.0f32, -2.0])?;
/// let w = GpuTensor::from_matrix(&ctx, MatRef::from_slice(&[3.0f32, 4.0], 1, 2)?)?;
/// let mut y = GpuTensor::<f32>::zeros(&ctx, 1, 1)?;
/// gemv(&ctx, &w, &x, &mut y)?;
/// block_on(ctx.finish())?; // the GEMV has run
/// assert!(ctx.cached_pipelines() >= 1); // compiled once, reused by the next call
/// println!("{} scratch buffers pooled", ctx.pooled_buffers());
/// ctx.check()?;
/// assert_eq!(ctx.first_device_error(), None);
/// # Ok::<(), Error>(())
/// ```
pub struct Context {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: GpuFeatures,
    target: Target,
    page_bytes: u64,
    binding_bytes: u64,
    state: Arc<AtomicU8>,
    first_error: Arc<Mutex<Option<String>>>,
    modules: Mutex<HashMap<ModuleSpec, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
    pool: Mutex<HashMap<PoolKey, Vec<wgpu::Buffer>>>,
    /// Bound to slots a kernel does not touch for the given parameters: one read-only buffer,
    /// and a writable one per binding index, so that a placeholder never makes a binding alias a
    /// writable one (WebGPU rejects writable aliasing within a bind group; wgpu on native does not
    /// check it, the browser test caught it).
    dummy_read: wgpu::Buffer,
    dummy_writes: Vec<wgpu::Buffer>,
}

/// The most bindings any kernel's layout has.
const MAX_SLOTS: usize = 8;

impl core::fmt::Debug for Context {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Context")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("features", &self.features)
            .field("page_bytes", &self.page_bytes)
            .finish_non_exhaustive()
    }
}

/// What to tell a user who has no adapter.
const NO_ADAPTER_HINT: &str = "no GPU adapter was found. On Linux without a GPU, install Mesa's \
     software Vulkan driver (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`); in a browser, \
     use one with WebGPU enabled; check `KERNELS_WGPU_ADAPTER` if it is set";

fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::BrowserWebGpu => 1,
        _ => 2,
    };
    (device, backend)
}

async fn pick_adapter(
    instance: &wgpu::Instance,
    options: &ContextOptions,
) -> Result<wgpu::Adapter> {
    let choice = match &options.adapter {
        #[cfg(not(target_arch = "wasm32"))]
        AdapterChoice::Auto => std::env::var("KERNELS_WGPU_ADAPTER")
            .map_or(AdapterChoice::Auto, AdapterChoice::NameContains),
        other => other.clone(),
    };
    let mut adapters = instance.enumerate_adapters(options.backends).await;
    if adapters.is_empty() {
        // Browsers do not enumerate; they answer a request.
        if let Ok(adapter) = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                ..wgpu::RequestAdapterOptions::default()
            })
            .await
        {
            adapters.push(adapter);
        }
    }
    adapters.sort_by_key(|a| rank(&a.get_info()));
    let found = match &choice {
        AdapterChoice::Auto => adapters.into_iter().next(),
        AdapterChoice::NameContains(name) => {
            let name = name.to_lowercase();
            adapters
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&name))
        }
    };
    found.ok_or(Error::Unsupported {
        feature: "a GPU adapter (Vulkan, Metal, DX12, GL or WebGPU)",
        hint: NO_ADAPTER_HINT,
    })
}

fn resolve(
    use_: FeatureUse,
    offered: bool,
    feature: &'static str,
    hint: &'static str,
) -> Result<bool> {
    match use_ {
        FeatureUse::Off => Ok(false),
        FeatureUse::Auto => Ok(offered),
        FeatureUse::Required if offered => Ok(true),
        FeatureUse::Required => Err(Error::Unsupported { feature, hint }),
    }
}

impl Context {
    /// Creates a context on the adapter `options` choose.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when no adapter matches (the message says how to get one) or when
    /// a feature is [`FeatureUse::Required`] and the adapter lacks it; [`Error::DeviceFailure`]
    /// when the device cannot be opened.
    pub async fn new(options: ContextOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: options.backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
        });
        let adapter = pick_adapter(&instance, &options).await?;
        let info = adapter.get_info();
        let offered = adapter.features();
        let features = GpuFeatures {
            shader_f16: resolve(
                options.shader_f16,
                offered.contains(wgpu::Features::SHADER_F16),
                "shader-f16",
                "this adapter cannot run f16 shaders; use FeatureUse::Auto to fall back to the \
                 portable kernels",
            )?,
            subgroups: resolve(
                options.subgroups,
                offered.contains(wgpu::Features::SUBGROUP),
                "subgroup operations",
                "this adapter offers no subgroups; use FeatureUse::Auto to fall back to the \
                 portable kernels",
            )?,
        };
        let mut required_features = wgpu::Features::empty();
        if features.shader_f16 {
            required_features |= wgpu::Features::SHADER_F16;
        }
        if features.subgroups {
            required_features |= wgpu::Features::SUBGROUP;
        }
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("kernels-wgpu"),
                required_features,
                required_limits: limits.clone(),
                ..wgpu::DeviceDescriptor::default()
            })
            .await
            .map_err(|_| Error::DeviceFailure {
                reason: "the adapter refused to open a device with its own limits and features",
            })?;
        let state = Arc::new(AtomicU8::new(HEALTHY));
        let first_error = Arc::new(Mutex::new(None));
        let (on_error, message) = (Arc::clone(&state), Arc::clone(&first_error));
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            let code = match error {
                wgpu::Error::OutOfMemory { .. } => OUT_OF_MEMORY,
                _ => REJECTED,
            };
            // Keep the first failure: later ones are usually its consequences.
            if on_error
                .compare_exchange(HEALTHY, code, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                *message.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
            }
        }));
        let on_lost = Arc::clone(&state);
        device.set_device_lost_callback(move |_, _| on_lost.store(LOST, Ordering::SeqCst));
        let device_page = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            .min(u64::from(u32::MAX));
        let binding_bytes = device_page - device_page % 4;
        let page_bytes = options
            .max_page_bytes
            .map_or(binding_bytes, |cap| cap.min(binding_bytes));
        let page_bytes = page_bytes - page_bytes % 4;
        if page_bytes < 4 {
            return Err(Error::InvalidParam {
                name: "max_page_bytes",
                value: page_bytes as f64,
                expected: "at least 4 bytes",
            });
        }
        let dummy = |usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("unused binding"),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        let target = if info.backend == wgpu::Backend::BrowserWebGpu {
            Target::Browser
        } else {
            Target::Native
        };
        Ok(Self {
            dummy_read: dummy(wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM),
            dummy_writes: (0..MAX_SLOTS)
                .map(|_| dummy(wgpu::BufferUsages::STORAGE))
                .collect(),
            device,
            queue,
            info,
            limits,
            features,
            target,
            page_bytes,
            binding_bytes,
            state,
            first_error,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
        })
    }

    /// [`Context::new`], blocking until the device is open (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking(options: ContextOptions) -> Result<Self> {
        pollster::block_on(Self::new(options))
    }

    /// The adapter's name, backend and type.
    #[must_use]
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device's limits (the adapter's own, requested in full).
    #[must_use]
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The optional features in use.
    #[must_use]
    pub fn features(&self) -> GpuFeatures {
        self.features
    }

    /// Bytes one tensor page (one storage binding) holds at most.
    #[must_use]
    pub fn page_bytes(&self) -> u64 {
        self.page_bytes
    }

    /// Bytes one storage binding holds at most on this device (the page size of vectors).
    #[must_use]
    pub fn binding_bytes(&self) -> u64 {
        self.binding_bytes
    }

    /// Pipelines compiled so far (each kernel, variant and set of constants once).
    #[must_use]
    pub fn cached_pipelines(&self) -> usize {
        self.pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Scratch buffers waiting in the pool for reuse.
    #[must_use]
    pub fn pooled_buffers(&self) -> usize {
        let pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        pool.values().map(Vec::len).sum()
    }

    /// The device's own words for the first error it reported, if any (for bug reports: the
    /// [`Error`] an op returns carries a fixed description).
    #[must_use]
    pub fn first_device_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fails if the device has been lost or has failed a command or an allocation.
    pub fn check(&self) -> Result<()> {
        match self.state.load(Ordering::SeqCst) {
            HEALTHY => Ok(()),
            OUT_OF_MEMORY => Err(Error::OutOfMemory {
                what: "a device buffer",
                bytes: 0,
            }),
            LOST => Err(Error::DeviceFailure {
                reason: "the device was lost (driver reset, device removed or destroyed)",
            }),
            _ => Err(Error::DeviceFailure {
                reason: "the device rejected a command (a wgpu validation error: a bug in \
                         kernels-wgpu, please report it)",
            }),
        }
    }

    /// Runs `make` (which allocates `bytes` for `what`) and turns an allocation failure the
    /// device reports into [`Error::OutOfMemory`].
    pub(crate) fn allocating<R>(
        &self,
        what: &'static str,
        bytes: u64,
        make: impl FnOnce() -> R,
    ) -> Result<R> {
        self.check()?;
        if bytes > self.limits.max_buffer_size {
            return Err(Error::InvalidParam {
                name: what,
                value: bytes as f64,
                expected: "a size in bytes within the device's max_buffer_size",
            });
        }
        let made = make();
        if self.state.load(Ordering::SeqCst) == OUT_OF_MEMORY {
            return Err(Error::OutOfMemory { what, bytes });
        }
        self.check()?;
        Ok(made)
    }

    /// Whether weights of `encoding` are bound as `array<f16>` (the `shader-f16` variant).
    pub(crate) fn native_f16(&self, encoding: u32) -> bool {
        self.features.shader_f16 && encoding == kernels_wgsl::element::F16
    }

    /// The pipeline of `kernel` with these override constants, compiled on first use;
    /// `native_f16` picks the `array<f16>` weights variant (see [`Context::native_f16`]).
    pub(crate) fn pipeline(
        &self,
        kernel: &Kernel,
        native_f16: bool,
        constants: &[(&'static str, u32)],
    ) -> Result<Arc<Pipeline>> {
        debug_assert!(
            kernel.slots.len() <= MAX_SLOTS,
            "{}: more slots than placeholders",
            kernel.entry
        );
        if kernel.needs_subgroups && !self.features.subgroups {
            return Err(Error::Unsupported {
                feature: "subgroup operations",
                hint: "this context does not use subgroups; the portable kernel runs instead",
            });
        }
        let module = ModuleSpec {
            family: kernel.family,
            native_f16: native_f16 && kernel.family.has_f16_variant(),
            subgroups: kernel.needs_subgroups,
            target: self.target,
        };
        let key = PipelineKey {
            module,
            entry: kernel.entry,
            constants: constants.to_vec(),
        };
        let mut pipelines = self
            .pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = pipelines.get(&key) {
            return Ok(Arc::clone(found));
        }
        self.check()?;
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        let shader = modules.entry(module).or_insert_with(|| {
            self.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&module.label()),
                    source: wgpu::ShaderSource::Wgsl(module.source().into()),
                })
        });
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .slots
            .iter()
            .enumerate()
            .map(|(binding, slot)| wgpu::BindGroupLayoutEntry {
                binding: binding as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match slot {
                        Slot::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Slot::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                        Slot::Uniform => wgpu::BufferBindingType::Uniform,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(kernel.entry),
                entries: &entries,
            });
        let pipeline_layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(kernel.entry),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let values: Vec<(&str, f64)> = constants
            .iter()
            .map(|&(name, value)| (name, f64::from(value)))
            .collect();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.entry),
                layout: Some(&pipeline_layout),
                module: shader,
                entry_point: Some(kernel.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &values,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        self.check()?;
        let made = Arc::new(Pipeline {
            compute: pipeline,
            layout,
            slots: kernel.slots,
        });
        pipelines.insert(key, Arc::clone(&made));
        Ok(made)
    }

    /// A scratch buffer of at least `bytes` from the pool (size classes are powers of two).
    fn take_scratch(&self, bytes: u64, usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let key = PoolKey {
            bytes: bytes.max(256).next_power_of_two(),
            usage,
        };
        let reused = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&key)
            .and_then(Vec::pop);
        match reused {
            Some(buffer) => Ok(buffer),
            None => self.allocating("scratch buffer", key.bytes, || {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("scratch"),
                    size: key.bytes,
                    usage,
                    mapped_at_creation: false,
                })
            }),
        }
    }

    /// A pooled storage buffer of at least `bytes` that outlives batches (read back between
    /// them, say); return it with [`Context::give_back`].
    pub(crate) fn take_storage(&self, bytes: u64) -> Result<wgpu::Buffer> {
        self.take_scratch(
            bytes,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        )
    }

    pub(crate) fn give_back(&self, buffers: impl IntoIterator<Item = wgpu::Buffer>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        for buffer in buffers {
            let key = PoolKey {
                bytes: buffer.size(),
                usage: buffer.usage(),
            };
            pool.entry(key).or_default().push(buffer);
        }
    }

    /// The first `count` values of `buffer` (a storage buffer), once every submitted command is
    /// done.
    pub(crate) async fn read_buffer<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        count: usize,
    ) -> Result<Vec<T>> {
        self.read_buffer_at(buffer, 0, count).await
    }

    /// `count` values of `buffer` from value `first` on (`first * size_of::<T>()` a multiple of
    /// 4; the buffer padded to whole words past the last value).
    pub(crate) async fn read_buffer_at<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        first: usize,
        count: usize,
    ) -> Result<Vec<T>> {
        self.check()?;
        let offset = (first * size_of::<T>()) as u64;
        let bytes = (count * size_of::<T>()) as u64;
        if bytes == 0 {
            // wgpu refuses empty buffer slices.
            return Ok(Vec::new());
        }
        // Mapped copies are whole words.
        let copied = bytes.div_ceil(4) * 4;
        let staging = self.take_scratch(
            copied,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, copied);
        self.queue.submit([encoder.finish()]);
        let (sender, receiver) = futures_channel::oneshot::channel();
        staging
            .slice(..copied)
            .map_async(wgpu::MapMode::Read, move |mapped| {
                let _ = sender.send(mapped);
            });
        // Native backends run the callback from a poll; browsers from their event loop.
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|_| Error::DeviceFailure {
                reason: "waiting for the device failed (it was lost or timed out)",
            })?;
        let mapped = receiver.await.map_err(|_| Error::DeviceFailure {
            reason: "the device dropped a download",
        })?;
        mapped.map_err(|_| Error::DeviceFailure {
            reason: "mapping a download buffer failed (the device was lost)",
        })?;
        let data =
            {
                let view = staging.slice(..copied).get_mapped_range().map_err(|_| {
                    Error::DeviceFailure {
                        reason: "a mapped download buffer could not be read",
                    }
                })?;
                // Copied out: a byte vector need not be aligned for `T`.
                bytemuck::pod_collect_to_vec(&view[..bytes as usize])
            };
        staging.unmap();
        self.give_back([staging]);
        self.check()?;
        Ok(data)
    }

    /// Completes once every command submitted so far has run on the device (for timing, and
    /// to bound the work in flight).
    pub async fn finish(&self) -> Result<()> {
        let (sender, receiver) = futures_channel::oneshot::channel();
        self.queue.on_submitted_work_done(move || {
            let _ = sender.send(());
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|_| Error::DeviceFailure {
                reason: "waiting for the device failed (it was lost or timed out)",
            })?;
        receiver.await.map_err(|_| Error::DeviceFailure {
            reason: "the device dropped its work",
        })?;
        self.check()
    }

    /// Writes `data` at the start of `buffer` (queued before the next submission).
    pub(crate) fn write_buffer(&self, buffer: &wgpu::Buffer, data: &[u8]) {
        self.queue.write_buffer(buffer, 0, data);
    }

    /// A new batch of dispatches.
    pub(crate) fn batch(&self) -> Result<Batch<'_>> {
        self.check()?;
        Ok(Batch {
            ctx: self,
            encoder: self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None }),
            scratch: Vec::new(),
            refused: None,
        })
    }
}

/// What a bind group slot is bound to.
#[derive(Clone)]
pub(crate) enum Bind<'a> {
    Buffer(&'a wgpu::Buffer),
    /// Nothing: a placeholder buffer the kernel does not touch for these parameters.
    Unused,
}

/// Dispatches recorded into one command buffer; scratch buffers return to the pool on submit.
pub(crate) struct Batch<'a> {
    ctx: &'a Context,
    encoder: wgpu::CommandEncoder,
    scratch: Vec<wgpu::Buffer>,
    /// The first dispatch refused for exceeding the device's grid: [`Batch::submit`] returns
    /// it and submits nothing, so the device never sees a dispatch it would reject (which
    /// wgpu reports as a lost context).
    refused: Option<Error>,
}

/// Workgroups along x and y for `count` workgroups in a 1-D range (a dimension holds at most
/// `max_per_dimension`).
pub(crate) fn grid(count: u32, max_per_dimension: u32) -> (u32, u32) {
    if count <= max_per_dimension {
        (count, 1)
    } else {
        (max_per_dimension, count.div_ceil(max_per_dimension))
    }
}

impl<'a> Batch<'a> {
    /// A pooled storage buffer of at least `bytes`, alive until this batch is submitted.
    pub(crate) fn scratch(&mut self, bytes: u64) -> Result<wgpu::Buffer> {
        let buffer = self.ctx.take_scratch(
            bytes,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        )?;
        self.scratch.push(buffer.clone());
        Ok(buffer)
    }

    /// A uniform buffer holding `params`.
    pub(crate) fn uniform<P: bytemuck::Pod>(&mut self, params: &P) -> Result<wgpu::Buffer> {
        let buffer = self.ctx.take_scratch(
            size_of::<P>() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        self.ctx
            .queue
            .write_buffer(&buffer, 0, bytemuck::bytes_of(params));
        self.scratch.push(buffer.clone());
        Ok(buffer)
    }

    /// Records `pipeline` over `workgroups` (x, y) with `binds` in slot order.
    pub(crate) fn dispatch(
        &mut self,
        pipeline: &Pipeline,
        binds: &[Bind<'_>],
        workgroups: (u32, u32),
    ) {
        if workgroups.0 == 0 || workgroups.1 == 0 || self.refused.is_some() {
            return;
        }
        let limit = self.ctx.limits.max_compute_workgroups_per_dimension;
        if workgroups.0 > limit || workgroups.1 > limit {
            self.refused = Some(Error::TooLarge {
                what: "a dispatch of this op (the operands are too long for one grid)",
                limit: u64::from(limit),
                unit: "workgroups per grid dimension (the device's limit)",
            });
            return;
        }
        let layout = &pipeline.layout;
        let entries: Vec<wgpu::BindGroupEntry<'_>> = binds
            .iter()
            .enumerate()
            .map(|(binding, bind)| wgpu::BindGroupEntry {
                binding: binding as u32,
                resource: match bind {
                    Bind::Buffer(buffer) => buffer.as_entire_binding(),
                    Bind::Unused => match pipeline.slots[binding] {
                        Slot::ReadWrite => self.ctx.dummy_writes[binding].as_entire_binding(),
                        Slot::Read | Slot::Uniform => self.ctx.dummy_read.as_entire_binding(),
                    },
                },
            })
            .collect();
        let group = self
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout,
                entries: &entries,
            });
        let mut pass = self
            .encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(&pipeline.compute);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(workgroups.0, workgroups.1, 1);
    }

    /// Records copying the whole of `from` into `to` (of the same size).
    pub(crate) fn copy(&mut self, from: &wgpu::Buffer, to: &wgpu::Buffer) {
        self.encoder
            .copy_buffer_to_buffer(from, 0, to, 0, from.size().min(to.size()));
    }

    /// Records zeroing `buffer`.
    pub(crate) fn clear(&mut self, buffer: &wgpu::Buffer) {
        self.encoder.clear_buffer(buffer, 0, None);
    }

    /// Submits the batch and returns its scratch buffers to the pool (the queue orders any later
    /// use after this submission).
    pub(crate) fn submit(self) -> Result<()> {
        if let Some(refused) = self.refused {
            self.ctx.give_back(self.scratch);
            return Err(refused);
        }
        self.ctx.queue.submit([self.encoder.finish()]);
        self.ctx.give_back(self.scratch);
        self.ctx.check()
    }

    pub(crate) fn ctx(&self) -> &'a Context {
        self.ctx
    }

    /// Records copying `bytes` from `from` at `from_offset` to `to` at `to_offset` (multiples of
    /// 4).
    pub(crate) fn copy_range(
        &mut self,
        from: &wgpu::Buffer,
        from_offset: u64,
        to: &wgpu::Buffer,
        to_offset: u64,
        bytes: u64,
    ) {
        self.encoder
            .copy_buffer_to_buffer(from, from_offset, to, to_offset, bytes);
    }

    /// Workgroups along x and y for `count` workgroups in a 1-D range.
    pub(crate) fn grid(&self, count: u32) -> (u32, u32) {
        grid(count, self.ctx.limits.max_compute_workgroups_per_dimension)
    }
}
