defmodule Quichex.OptionsTest do
  # Bad options raise ArgumentError naming the option and what it expected,
  # before anything starts; the option docs come from the same schemas.
  use ExUnit.Case, async: true

  # The wrong-length generator crashes its connection process on purpose.
  @moduletag :capture_log

  import Quichex.Test.Helpers

  alias Quichex.{Config, Connection, Listener, Stream}
  alias Quichex.Config.Schema

  defmodule NotAGenerator do
  end

  defmodule ShortCIDs do
    @behaviour Quichex.CIDGenerator

    @impl true
    def generate_cid(_length, _options), do: "short"
  end

  defmodule MarkedCIDs do
    @behaviour Quichex.CIDGenerator

    @impl true
    def generate_cid(length, []), do: <<0xAB>> <> :crypto.strong_rand_bytes(length - 1)
  end

  defp listen(opts) do
    Listener.start_link(
      Keyword.merge([ip: {127, 0, 0, 1}, port: 0, config: server_config()], opts)
    )
  end

  describe "the message names the option and the expected type" do
    test "listener options" do
      assert_raise ArgumentError, ~r/option :owner: expected a pid, got: "me"/, fn ->
        listen(owner: "me")
      end

      assert_raise ArgumentError, ~r/option :handler: expected an atom, got: "Echo"/, fn ->
        listen(handler: "Echo")
      end

      assert_raise ArgumentError, ~r/option :max_connections: expected a positive integer/, fn ->
        listen(max_connections: 0)
      end

      assert_raise ArgumentError,
                   ~r/option :accept_early_data: expected a 1-arity function, got: :yes/,
                   fn -> listen(accept_early_data: :yes) end

      assert_raise ArgumentError,
                   ~r/option :stateless_reset_key: expected at least 16 bytes/,
                   fn -> listen(stateless_reset_key: "0123456789") end
    end

    test "a listener config without :application_protos" do
      config = Config.new(load_cert_chain_from_pem_file: certs().cert)

      assert_raise ArgumentError, "the listener config needs :application_protos", fn ->
        listen(config: config)
      end
    end

    test "connection options" do
      assert_raise ArgumentError, ~r/option :server_name: expected a string, got: :host/, fn ->
        Connection.connect(
          host: "localhost",
          port: 4433,
          config: client_config(),
          server_name: :host
        )
      end

      assert_raise ArgumentError,
                   ~r/option :stream_opts: expected a keyword list, got: \[:active\]/,
                   fn ->
                     Connection.connect(
                       host: "localhost",
                       port: 4433,
                       config: client_config(),
                       stream_opts: [:active]
                     )
                   end
    end

    test "stream options" do
      {listener, port} = start_listener()
      on_exit(fn -> Listener.stop(listener) end)
      conn = connect!(port)
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)

      assert_raise ArgumentError,
                   ~r/option :length: expected a non-negative integer, got: -1/,
                   fn ->
                     Stream.recv(stream, length: -1)
                   end

      assert_raise ArgumentError,
                   ~r/option :active: expected a boolean or one of :once or a positive integer/,
                   fn ->
                     Stream.setopts(stream, active: :twice)
                   end
    end
  end

  describe ":connection_id_generator" do
    test "something that is not a generator is refused when the listener or connection starts" do
      assert_raise ArgumentError,
                   ~r/option :connection_id_generator: .*NotAGenerator does not implement Quichex.CIDGenerator/,
                   fn -> listen(connection_id_generator: NotAGenerator) end

      assert_raise ArgumentError,
                   ~r/option :connection_id_generator: expected a module or \{module, options\}, got: "random"/,
                   fn ->
                     Connection.connect(
                       host: "localhost",
                       port: 4433,
                       config: client_config(),
                       connection_id_generator: "random"
                     )
                   end
    end

    test "a bare module is {module, []}: the listener's connection IDs come from it" do
      {:ok, listener} = listen(connection_id_generator: MarkedCIDs)
      on_exit(fn -> Listener.stop(listener) end)
      {:ok, {_, port}} = Listener.sockname(listener)
      conn = connect!(port)
      server = accept!(listener)
      assert {:ok, %{destination_id: <<0xAB, _::binary-size(15)>>}} = Connection.info(conn)
      assert {:ok, %{source_id: <<0xAB, _::binary-size(15)>>}} = Connection.info(server)
    end

    test "a generator that returns the wrong length fails the connection that called it" do
      assert {:error, %ArgumentError{message: message}} =
               Connection.connect(
                 host: "localhost",
                 port: 4433,
                 config: client_config(),
                 connection_id_generator: ShortCIDs
               )

      assert message =~ "ShortCIDs.generate_cid/2 must return 16 bytes, got: \"short\""
    end
  end

  describe "generated docs" do
    test "Quichex.Config's moduledoc lists every option as the schema renders it" do
      {:docs_v1, _, :elixir, _, %{"en" => moduledoc}, _, _} = Code.fetch_docs(Config)
      rendered = Schema.docs(Config.__schema__())
      assert String.contains?(moduledoc, rendered)

      for {name, spec} <- Config.__schema__() do
        assert rendered =~ "* `#{inspect(name)}` (#{Schema.type_doc(spec[:type])})"
        if spec[:default] != nil, do: assert(rendered =~ "Default: `#{inspect(spec[:default])}`")
      end
    end

    test "every setter's doc example uses a value the option accepts" do
      for {name, spec} <- Config.__schema__() do
        example = Schema.example(spec)
        assert Schema.valid?(spec[:type], example), "#{name}: #{inspect(example)}"
        assert Config.get(Config.put(Config.new(), name, example), name) == example
      end
    end
  end
end
