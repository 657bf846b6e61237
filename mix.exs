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
