use super::DeviceArgs;
use anyhow::Result;
use clap::Args;
use serde_json::json;
use vqclip::gpu::list_adapters;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(dev: &DeviceArgs, a: InfoArgs) -> Result<()> {
    let adapters = list_adapters();
    let opts = dev.options()?;
    let gpu = vqclip::Gpu::new(&opts);
    // The pool's budget (--max-memory, or the adapter's default); null: none.
    let budget = gpu.as_ref().ok().and_then(|g| g.memory_budget());
    // Tensor-core style units, as wgpu reports them, and whether the f16 products of
    // `--precision f16` inference run on them (ops::matmul::Variant::Coop).
    let coop = gpu
        .as_ref()
        .ok()
        .and_then(|_| vqclip::gpu::cooperative_matrix(&opts).ok());
    let coop_used = gpu.as_ref().ok().and_then(|g| {
        g.coop_f16_size()
            .filter(|_| vqclip::ops::matmul::coop_default(g))
    });
    let (chosen, limits, features, err) = match &gpu {
        Ok(g) => {
            let l = g.limits();
            (
                Some(vqclip::gpu::AdapterSummary::from(g.info())),
                Some(json!({
                    "max_buffer_size": l.max_buffer_size,
                    "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
                    "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
                    "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
                    "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
                    "max_compute_workgroup_size": [l.max_compute_workgroup_size_x, l.max_compute_workgroup_size_y, l.max_compute_workgroup_size_z],
                    "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
                    "min_uniform_buffer_offset_alignment": l.min_uniform_buffer_offset_alignment,
                })),
                g.features()
                    .iter_names()
                    .map(|(n, _)| n.to_string())
                    .collect::<Vec<_>>(),
                None,
            )
        }
        Err(e) => (None, None, vec![], Some(e.to_string())),
    };
    if a.json {
        let v = json!({
            "version": vqclip::VERSION,
            "adapters": adapters,
            "chosen": chosen,
            "limits": limits,
            "features": features,
            "memory_budget_bytes": budget,
            "cooperative_matrix": coop,
            "cooperative_matrix_f16_products": coop_used.map(|s| format!("{s}x{s}x{s} F16->F32")),
            "error": err,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("vqclip {}", vqclip::VERSION);
        println!("adapters seen:");
        if adapters.is_empty() {
            println!("  (none)");
        }
        for ad in &adapters {
            println!(
                "  {} [{} {}] driver: {} {}",
                ad.name, ad.backend, ad.device_type, ad.driver, ad.driver_info
            );
        }
        if let (Some(c), Some(l)) = (&chosen, &limits) {
            println!("chosen: {} ({}, {})", c.name, c.backend, c.device_type);
            println!("limits:");
            if let Some(o) = l.as_object() {
                for (k, v) in o {
                    println!("  {k}: {v}");
                }
            }
            println!(
                "features: {}",
                if features.is_empty() {
                    "(none of SHADER_F16, SUBGROUP, TIMESTAMP_QUERY)".to_string()
                } else {
                    features.join(", ")
                }
            );
            if let Some(c) = &coop {
                let configs: Vec<String> = c
                    .configurations
                    .iter()
                    .map(|x| format!("{}x{}x{} {}->{}", x.m, x.n, x.k, x.ab_type, x.cr_type))
                    .collect();
                let used = match (coop_used, c.f16_size) {
                    (Some(s), _) => format!("for f16 products ({s}x{s}x{s} F16->F32)"),
                    (None, Some(_))
                        if vqclip::ops::env::COOP_MATRIX.get().as_deref() == Some("off") =>
                    {
                        "no (VQCLIP_COOP_MATRIX=off)".to_string()
                    }
                    (None, Some(_)) => "no: on CPU adapters the SIMD kernels run f16 products \
                                        by default (VQCLIP_COOP_MATRIX=on uses it)"
                        .to_string(),
                    (None, None) => {
                        "no (no square F16->F32 configuration of side 8 or 16)".to_string()
                    }
                };
                println!(
                    "cooperative matrix (EXPERIMENTAL_COOPERATIVE_MATRIX): {}; configurations: {}; \
                     used by vqclip: {used}",
                    if c.feature { "offered" } else { "not offered" },
                    if configs.is_empty() {
                        "none reported".to_string()
                    } else {
                        configs.join(", ")
                    }
                );
            }
            println!(
                "memory budget: {} (--max-memory)",
                budget.map_or("none".to_string(), vqclip::gpu::human_bytes)
            );
        }
    }
    match gpu {
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
