defmodule Mix.Tasks.Compile.QuichexNif do
  @moduledoc """
  Builds the `native/quichex_nif` Rust crate with `cargo build --release` and
  copies the shared library into `priv/native/`.

  Hex is not needed: this compiler replaces `rustler`'s Mix side. It rebuilds
  only when a file under `native/quichex_nif` (sources, `Cargo.toml`,
  `Cargo.lock`) or a source of the vendored quiche in `native/vendor/quiche`
  is newer than the library in `priv/native/`.

  Set `QUICHEX_SKIP_NIF_BUILD=1` to skip the build (for example when a
  prebuilt library was already copied into `priv/native/`).

  Set `QUICHEX_NIF_PROFILE=debug` to build with cargo's `dev` profile
  instead (debug assertions, overflow checks, full debug info; for running
  the test suite against a debug NIF, or under a memory checker). The
  library is rebuilt whenever the profile changes; unset (or `release`) goes
  back to the release build.
  """
  use Mix.Task.Compiler

  @crate "quichex_nif"

  @impl Mix.Task.Compiler
  def run(_args) do
    root = Path.expand("../../..", __DIR__)
    crate_dir = Path.join([root, "native", @crate])
    priv_dir = Path.join([Mix.Project.app_path(), "priv", "native"])
    profile = profile()
    src_lib = Path.join([crate_dir, "target", profile_dir(profile), lib_file()])
    dest_lib = Path.join(priv_dir, "lib#{@crate}.so")
    # Which profile the library in priv/ was built with.
    stamp = Path.join(priv_dir, "lib#{@crate}.profile")

    cond do
      System.get_env("QUICHEX_SKIP_NIF_BUILD") in ["1", "true"] ->
        {:noop, []}

      up_to_date?(crate_dir, dest_lib) and built_profile(stamp) == profile ->
        {:noop, []}

      true ->
        build!(crate_dir, profile)
        File.mkdir_p!(priv_dir)
        # Copy to a temporary name and rename, so a loaded library is never
        # overwritten in place (that would crash a running VM).
        tmp = dest_lib <> ".tmp"
        File.cp!(src_lib, tmp)
        File.rename!(tmp, dest_lib)
        File.write!(stamp, profile)
        {:ok, []}
    end
  end

  @impl Mix.Task.Compiler
  def clean do
    File.rm_rf!(Path.join([Mix.Project.app_path(), "priv", "native"]))
    :ok
  end

  defp profile do
    case System.get_env("QUICHEX_NIF_PROFILE", "release") do
      profile when profile in ["release", "debug"] ->
        profile

      other ->
        Mix.raise("QUICHEX_NIF_PROFILE must be release or debug, got: #{inspect(other)}")
    end
  end

  # cargo's output directory for a profile.
  defp profile_dir("release"), do: "release"
  defp profile_dir("debug"), do: "debug"

  # A library built before the stamp existed was a release build.
  defp built_profile(stamp) do
    case File.read(stamp) do
      {:ok, profile} -> profile
      {:error, _} -> "release"
    end
  end

  defp lib_file do
    case :os.type() do
      {:unix, :darwin} -> "lib#{@crate}.dylib"
      _ -> "lib#{@crate}.so"
    end
  end

  defp up_to_date?(crate_dir, dest_lib) do
    case File.stat(dest_lib, time: :posix) do
      {:ok, %{mtime: built}} ->
        crate_dir
        |> source_files()
        |> Enum.all?(fn file -> File.stat!(file, time: :posix).mtime <= built end)

      {:error, _} ->
        false
    end
  end

  # The crate's sources and the vendored quiche it builds against.
  defp source_files(crate_dir) do
    vendor = Path.join(crate_dir, "../vendor/quiche")

    Path.wildcard(Path.join(crate_dir, "src/**/*.rs")) ++
      Path.wildcard(Path.join(vendor, "src/**/*.rs")) ++
      Enum.filter(
        [Path.join(crate_dir, "Cargo.toml"), Path.join(crate_dir, "Cargo.lock")],
        &File.exists?/1
      )
  end

  defp build!(crate_dir, profile) do
    check_tools!()

    args =
      if profile == "release", do: ["build", "--release", "--locked"], else: ["build", "--locked"]

    Mix.shell().info("==> quichex: cargo #{Enum.join(args, " ")} (native/#{@crate})")

    {_, status} =
      System.cmd(cargo(), args,
        cd: crate_dir,
        into: IO.stream(:stdio, :line),
        stderr_to_stdout: true
      )

    if status != 0 do
      Mix.raise("cargo build (#{profile}) failed for native/#{@crate} (exit status #{status})")
    end
  end

  defp check_tools! do
    missing =
      [
        {"cargo", cargo(), "the Rust toolchain (https://rustup.rs)"},
        {"cmake", System.find_executable("cmake"), "cmake (Debian: apt-get install cmake)"},
        {"a C compiler", c_compiler(), "gcc or clang (Debian: apt-get install build-essential)"}
      ]
      |> Enum.filter(fn {_name, path, _hint} -> is_nil(path) end)

    if missing != [] do
      lines =
        Enum.map_join(missing, "\n", fn {name, _, hint} -> "  * #{name}: install #{hint}" end)

      Mix.raise("""
      quichex: cannot build the NIF (quiche and BoringSSL), missing tools:
      #{lines}
      Or run `make deps`, which installs them on Debian.
      """)
    end
  end

  defp cargo do
    System.find_executable("cargo") ||
      Enum.find([Path.expand("~/.cargo/bin/cargo")], &File.exists?/1)
  end

  defp c_compiler do
    Enum.find_value(["cc", "gcc", "clang"], &System.find_executable/1)
  end
end
