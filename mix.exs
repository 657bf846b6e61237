Code.require_file("lib/mix/tasks/compile.quichex_nif.ex", __DIR__)

defmodule Quichex.MixProject do
  use Mix.Project

  @version "0.1.0"

  def project do
    [
      app: :quichex,
      version: @version,
      elixir: "~> 1.14",
      compilers: [:quichex_nif] ++ Mix.compilers(),
      elixirc_paths: elixirc_paths(Mix.env()),
      start_permanent: Mix.env() == :prod,
      deps: [],
      description: "QUIC transport for Elixir: a sans-IO Rust NIF over cloudflare quiche",
      package: [licenses: ["BSD-2-Clause"]],
      docs: [main: "readme", extras: ["README.md" | Path.wildcard("guides/*.md")]],
      test_paths: ["test", "integration", "soak"],
      dialyzer: [plt_add_apps: [:mix]],
      # `mix test --cover` (make test): lib/'s line coverage, failing below 90%.
      test_coverage: [
        summary: [threshold: 90],
        ignore_modules: [
          # test/support, compiled into the app in the test environment, and
          # its :telemetry stand-in: not lib/.
          ~r/^Quichex\.Test\./,
          :telemetry,
          # NIF stubs: each body is replaced by the Rust function when the
          # library loads, so with the NIF loaded no stub line can run.
          Quichex.Native,
          # Struct definitions only: their one line is the generated
          # __struct__/0,1, which struct literals expand at compile time.
          Quichex.Connection.Streams.Entry,
          Quichex.Connection.Streams.Waiter,
          Quichex.Connection.WriteQueue.Write
        ]
      ],
      # PropEr comes from Debian's erlang-proper and is used by tests only.
      xref: [exclude: [:proper, :proper_types]]
    ]
  end

  def application do
    [
      mod: {Quichex.Application, []},
      extra_applications: [:logger, :crypto, :public_key]
    ]
  end

  # lib/mix holds the NIF compiler, loaded above by mix.exs itself, and the
  # mix quichex.gen.cert task, compiled with the library.
  defp elixirc_paths(:test), do: elixirc_paths(:prod) ++ ["test/support"]

  defp elixirc_paths(_),
    do: ["lib/quichex.ex", "lib/quichex", "lib/mix/tasks/quichex.gen.cert.ex"]
end
