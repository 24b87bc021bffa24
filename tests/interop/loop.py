"""The denoising loop of diffusers' pipelines, for comparing diffkit's samplers with diffusers' schedulers."""
def reference(scheduler, net, latents, steps, *, cond=None, generator=None, **timesteps):
    """The loop of diffusers' pipelines: scale by init_noise_sigma, scale_model_input, model, step."""
    scheduler.set_timesteps(steps, **timesteps) if steps else scheduler.set_timesteps(**timesteps)
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = net(inp, t.expand(len(x)), **(cond or {}), return_dict=False)[0][:, :latents.shape[1]]
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
