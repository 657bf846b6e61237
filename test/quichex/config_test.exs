defmodule Quichex.ConfigTest do
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Config, TransportError}

  doctest Quichex.Config

  @big 4_611_686_018_427_387_904

  # {option, a valid value, invalid values}
  @cases [
    {:application_protos, ["h3", "echo"], [[], [""], [String.duplicate("a", 256)], "h3", [:h3]]},
    {:max_idle_timeout, 10_000, [-1, @big, "10", 1.5]},
    {:initial_max_data, 5_000_000, [-1, @big, :lots]},
    {:initial_max_stream_data_bidi_local, 100_000, [-1, @big]},
    {:initial_max_stream_data_bidi_remote, 100_000, [-1, @big]},
    {:initial_max_stream_data_uni, 100_000, [-1, @big]},
    {:initial_max_streams_bidi, 50, [-1, 1_152_921_504_606_846_977]},
    {:initial_max_streams_uni, 50, [-1, 1_152_921_504_606_846_977]},
    {:max_recv_udp_payload_size, 1500, [1199, 65528, nil]},
    {:max_send_udp_payload_size, 1400, [1199, 65528]},
    {:ack_delay_exponent, 5, [21, -1]},
    {:max_ack_delay, 30, [16384, -1]},
    {:disable_active_migration, true, [1, "true"]},
    {:active_connection_id_limit, 4, [1, 0, -2]},
    {:cc_algorithm, :bbr2, [:bbr1, :vegas, "cubic"]},
    {:enable_hystart, false, [0]},
    {:enable_pacing, false, [:no]},
    {:max_pacing_rate, 10_000_000, [0, -5]},
    {:enable_dgram, true, [1, nil]},
    {:dgram_recv_queue_len, 64, [0, 1_000_001]},
    {:dgram_send_queue_len, 64, [0, -1]},
    {:verify_peer, false, ["no"]},
    {:load_cert_chain_from_pem_file, :cert, ["", 42, "a\0b"]},
    {:load_priv_key_from_pem_file, :key, ["", :file]},
    {:load_verify_locations_from_file, :ca, [""]},
    {:load_verify_locations_from_directory, :dir, [""]},
    {:grease, false, [nil]},
    {:keylog_file, :keylog, ["", :yes]},
    {:qlog_dir, :dir, ["", 42]},
    {:qlog_level, :extra, [:all, "base"]},
    {:enable_early_data, true, [1]},
    {:discover_pmtu, true, [[]]},
    {:max_connection_window, 50_000_000, [0, @big]},
    {:max_stream_window, 20_000_000, [0, @big]},
    {:max_amplification_factor, 2, [0, 4]},
    {:initial_congestion_window_packets, 20, [0, 100_001]},
    {:ticket_key, :ticket, [<<1, 2, 3>>, String.duplicate("k", 49)]}
  ]

  defp value(:cert), do: certs().cert
  defp value(:key), do: certs().key
  defp value(:ca), do: certs().ca
  defp value(:dir), do: Path.dirname(certs().ca)
  defp value(:ticket), do: :binary.copy(<<7>>, 48)
  defp value(:keylog), do: Path.join(System.tmp_dir!(), "quichex-test-keylog")
  defp value(v), do: v

  test "the schema covers every option the issue lists" do
    names = Keyword.keys(Config.__schema__())
    for {name, _, _} <- @cases, do: assert(name in names)
    assert length(names) == length(@cases)
  end

  describe "valid values reach quiche" do
    for {name, valid, _} <- @cases do
      test "#{name}" do
        name = unquote(name)
        value = value(unquote(Macro.escape(valid)))
        config = Config.new([{name, value}] ++ cert_opts(name))
        assert Config.get(config, name) == value

        # The NIF decodes the option into a quiche::Config and reports back
        # what it applied.
        {:ok, native} = Config.build(config, :server)
        described = Quichex.Native.config_describe(native)

        assert described_value(described, name) == value

        # The builder form gives the same config.
        setter =
          case Atom.to_string(name) do
            "load_" <> _ -> name
            other -> String.to_atom("set_" <> other)
          end

        assert apply(Config, setter, [Config.new(cert_opts(name)), value]) == config
      end
    end
  end

  describe "invalid values raise ArgumentError naming the option" do
    for {name, _, invalids} <- @cases, {bad, i} <- Enum.with_index(invalids) do
      test "#{name} ##{i}: #{inspect(bad, printable_limit: 12, limit: 3)}" do
        name = unquote(name)
        bad = unquote(Macro.escape(bad))

        assert_raise ArgumentError, ~r/#{name}/, fn -> Config.new([{name, bad}]) end

        setter =
          case Atom.to_string(name) do
            "load_" <> _ -> name
            other -> String.to_atom("set_" <> other)
          end

        assert_raise ArgumentError, ~r/#{name}/, fn ->
          apply(Config, setter, [Config.new(), bad])
        end
      end
    end
  end

  # The three datagram options reach the NIF as one {enabled, recv, send}.
  defp described_value(described, name)
       when name in [:enable_dgram, :dgram_recv_queue_len, :dgram_send_queue_len] do
    {enabled, recv, send} = described[:enable_dgram]
    %{enable_dgram: enabled, dgram_recv_queue_len: recv, dgram_send_queue_len: send}[name]
  end

  # qlog_dir and qlog_level reach the NIF as one {dir, level}.
  defp described_value(described, :qlog_dir), do: elem(described[:qlog_dir], 0)

  defp described_value(described, :qlog_level), do: elem(described[:qlog_dir], 1)

  defp described_value(described, name), do: described[name]

  # A private key is only accepted next to its certificate.
  defp cert_opts(:load_priv_key_from_pem_file), do: [load_cert_chain_from_pem_file: certs().cert]
  # A qlog level reaches quiche with its directory.
  defp cert_opts(:qlog_level), do: [qlog_dir: System.tmp_dir!()]
  defp cert_opts(_), do: []

  test "unknown options raise ArgumentError naming them" do
    assert_raise ArgumentError, ~r/:no_such_option/, fn -> Config.new(no_such_option: 1) end
    assert_raise ArgumentError, ~r/:nope/, fn -> Config.put(Config.new(), :nope, 1) end
    assert_raise ArgumentError, fn -> Config.new(:not_a_list) end
  end

  test "library defaults reach quiche (visible to the peer as transport parameters)" do
    {listener, port} =
      start_listener(config_opts: [initial_max_streams_bidi: 7, max_idle_timeout: 12_345])

    conn = connect!(port, config_opts: [initial_max_data: 777_777])
    server = accept!(listener)

    {:ok, %{peer_transport_params: tp}} = Quichex.Connection.info(conn)
    assert tp.initial_max_streams_bidi == 7
    assert tp.max_idle_timeout == 12_345

    {:ok, %{peer_transport_params: tp}} = Quichex.Connection.info(server)
    assert tp.initial_max_data == 777_777
    Quichex.Listener.stop(listener)
  end

  describe "TLS files" do
    test "a missing certificate file is a TransportError naming the option" do
      config = server_config(load_cert_chain_from_pem_file: "/nonexistent/cert.pem")

      assert {:error,
              %TransportError{
                reason: {:tls_file, :load_cert_chain_from_pem_file, "/nonexistent/cert.pem"}
              }} = Config.check(config, :server)

      assert {:error, %TransportError{}} = Quichex.Listener.start_link(port: 0, config: config)
    end

    test "a garbage PEM file is a TransportError" do
      config = server_config(load_cert_chain_from_pem_file: certs().garbage)

      assert {:error, %TransportError{reason: {:tls_file, :load_cert_chain_from_pem_file, _}}} =
               Config.check(config, :server)
    end

    test "a key that does not match the certificate is a TransportError" do
      config = server_config(load_priv_key_from_pem_file: certs().other_key)

      assert {:error, %TransportError{reason: {:tls_file, :load_priv_key_from_pem_file, _}}} =
               Config.check(config, :server)

      assert {:error, %TransportError{}} = Quichex.Listener.start_link(port: 0, config: config)
    end

    test "a garbage CA file fails connect/1 with a TransportError" do
      config = client_config(load_verify_locations_from_file: certs().garbage)

      assert {:error,
              %TransportError{reason: {:tls_file, :load_verify_locations_from_file, _}} = error} =
               Quichex.Connection.connect(host: "127.0.0.1", port: 9, config: config)

      assert Exception.message(error) =~ "load_verify_locations_from_file"
    end

    test "a file where a directory is expected is a TransportError" do
      config = client_config(load_verify_locations_from_directory: certs().ca)
      assert {:error, %TransportError{}} = Config.check(config)
    end
  end

  test "property: random option lists give a config or ArgumentError, nothing else" do
    names = Keyword.keys(Config.__schema__()) ++ [:bogus, :port]

    value =
      :proper_types.oneof([
        :proper_types.integer(),
        :proper_types.integer(-1, 70_000),
        :proper_types.elements([@big, 1_152_921_504_606_846_977, 48, 0]),
        :proper_types.boolean(),
        :proper_types.atom(),
        :proper_types.binary(),
        :proper_types.list(:proper_types.binary()),
        :proper_types.elements([:reno, :cubic, :bbr2, nil, [], "x", 1.5])
      ])

    opts = :proper_types.list(:proper_types.tuple([:proper_types.elements(names), value]))

    property =
      forall(opts, fn opts ->
        try do
          config = Config.new(opts)
          # Whatever Elixir accepts, the NIF accepts too (no TLS files here).
          match?(%Config{}, config) and
            (Enum.any?(opts, fn {k, _} ->
               k |> Atom.to_string() |> String.starts_with?("load_")
             end) or
               match?({:ok, _}, Config.build(config, :client)))
        rescue
          ArgumentError -> true
        end
      end)

    proper!(property, 500)
  end
end
